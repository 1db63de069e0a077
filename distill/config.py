"""Old module path of `HybridConfig`: the remote-code shim of checkpoints written before the
architecture moved to `distill.model` imports it from here. New code imports `distill.model.config`."""

from distill.model.config import HybridConfig

__all__ = ["HybridConfig"]
