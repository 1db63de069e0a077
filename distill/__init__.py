"""Offline conversion of a softmax-attention LLM into a Gated DeltaNet hybrid.

`distill.model` is the architecture (what a checkpoint is); the other modules are the method that
makes one. Importing `distill` registers the hybrid with transformers' Auto classes (see distill.model).
"""

from distill.model import HybridConfig, HybridForCausalLM

__all__ = ["HybridConfig", "HybridForCausalLM"]
