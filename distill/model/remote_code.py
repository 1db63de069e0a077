"""Checkpoints that plain transformers loads: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

config.json's `auto_map` points at a one-import file written beside the weights, which takes the
architecture from the installed hybrid-llm package; none of the model's code is copied into the
checkpoint. (`import distill` registers the same classes without trust_remote_code.)

Shims written before the architecture moved to `distill.model` import `distill.model.config` and
`distill.model.modeling`; those two modules stay as aliases so that old checkpoints still load.
"""

from __future__ import annotations

from pathlib import Path

SHIM_MODULE = "hybrid_gdn"
AUTO_MAP = {
    "AutoConfig": f"{SHIM_MODULE}.HybridConfig",
    "AutoModelForCausalLM": f"{SHIM_MODULE}.HybridForCausalLM",
}
# transformers drops try/except blocks before checking a remote file's imports, so a missing package
# reaches the user as this message rather than as "pip install distill".
SHIM_SOURCE = '''"""The hybrid_gdn architecture, from the hybrid-llm package (loaded through config.json's auto_map)."""
try:
    from distill.model import HybridConfig, HybridForCausalLM
except ImportError as e:
    raise ImportError("this checkpoint's architecture (model_type hybrid_gdn) comes from the hybrid-llm "
                      "package: pip install hybrid-llm") from e

__all__ = ["HybridConfig", "HybridForCausalLM"]
'''


def write_shim(checkpoint_dir: str | Path) -> None:
    (Path(checkpoint_dir) / f"{SHIM_MODULE}.py").write_text(SHIM_SOURCE)
