"""The hybrid_gdn architecture, from the hybrid-llm package (loaded through config.json's auto_map)."""
try:
    from distill.config import HybridConfig
    from distill.modeling import HybridForCausalLM
except ImportError as e:
    raise ImportError("this checkpoint's architecture (model_type hybrid_gdn) comes from the hybrid-llm "
                      "package: pip install hybrid-llm") from e

__all__ = ["HybridConfig", "HybridForCausalLM"]
