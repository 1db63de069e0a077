"""The hybrid architecture and nothing of the method that trains it: config, families, GDN mixer,
transformers model, weight transfer, teacher loading, checkpoint files. `serve/` imports this wing only.

Importing it registers the hybrid with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(checkpoint)` works for every checkpoint we write.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from distill.model.config import HybridConfig
from distill.model.modeling import HybridForCausalLM

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = ["HybridConfig", "HybridForCausalLM"]
