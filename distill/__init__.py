"""Offline conversion of a softmax-attention LLM into a Gated DeltaNet hybrid.

Importing `distill` registers the hybrid with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(checkpoint)` works for every checkpoint we write.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from distill.config import HybridConfig
from distill.modeling import HybridForCausalLM

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = ["HybridConfig", "HybridForCausalLM"]
