"""vLLM plugin (entry point `vllm.general_plugins: hybrid_gdn = serve.plugin:register`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), so the
engine core, which runs in another process, finds the hybrid too. It registers
  - the config: `import distill.model` registers HybridConfig (model_type "hybrid_gdn") with
    transformers' AutoConfig, which vLLM's config loading goes through;
  - the model: architecture "HybridForCausalLM" -> serve.model:HybridForCausalLM, imported lazily
    (only when a hybrid checkpoint is actually loaded).
It must stay cheap and idempotent: vLLM may call it several times in one process.
"""

from __future__ import annotations

ARCHITECTURE = "HybridForCausalLM"
MODEL_CLASS = "serve.model:HybridForCausalLM"


def register() -> None:
    import distill.model  # noqa: F401  (AutoConfig.register("hybrid_gdn", HybridConfig))
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
