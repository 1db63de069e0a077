"""Old module path of `HybridForCausalLM`: the remote-code shim of checkpoints written before the
architecture moved to `distill.model` imports it from here. New code imports `distill.model.modeling`."""

from distill.model.modeling import HybridForCausalLM

__all__ = ["HybridForCausalLM"]
