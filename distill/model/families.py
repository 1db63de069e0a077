"""Teacher families we can convert: the transformers modules each one is built from, and the rules in
which families differ (which attention projections carry a bias, whether q and k are RMS-normed).

A hybrid keeps the teacher's own softmax attention, MLP, norms and rotary embedding modules, so a
softmax layer computes exactly what the teacher computes (RoPE scaling variants, GQA, q/k/v biases,
Qwen3's q/k RMSNorm). The GDN mixer, vLLM's layers and the weight transfer read the rules below.
Adding a family means adding one row to RULES and one to `_modules`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distill.errors import UserError


class UnsupportedTeacherError(UserError):
    """The teacher's architecture is not one we know how to convert."""


@dataclass(frozen=True)
class FamilyRules:
    """What a family's attention block has beyond the common Llama shape."""

    qkv_bias: bool | None = None  # None: the config's `attention_bias` decides
    o_bias: bool | None = None  # None: the config's `attention_bias` decides
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE

    @property
    def fixed_biases(self) -> bool:
        """The family hard-codes its biases, so a config's `attention_bias` says nothing about them."""
        return self.qkv_bias is not None


RULES = {
    "llama": FamilyRules(),
    "qwen2": FamilyRules(qkv_bias=True, o_bias=False),  # Qwen2 hard-codes q/k/v biases, none on o_proj
    "qwen3": FamilyRules(qk_norm=True),
    "mistral": FamilyRules(qkv_bias=False, o_bias=False),
}
SUPPORTED_FAMILIES = tuple(RULES)


@dataclass(frozen=True)
class Family:
    model_type: str
    attention: type[nn.Module]
    mlp: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]


def _modules() -> dict[str, Family]:
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    return {
        "llama": Family("llama", llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm, llama.LlamaRotaryEmbedding),
        "qwen2": Family("qwen2", qwen2.Qwen2Attention, qwen2.Qwen2MLP, qwen2.Qwen2RMSNorm, qwen2.Qwen2RotaryEmbedding),
        "qwen3": Family("qwen3", qwen3.Qwen3Attention, qwen3.Qwen3MLP, qwen3.Qwen3RMSNorm, qwen3.Qwen3RotaryEmbedding),
        "mistral": Family(
            "mistral", mistral.MistralAttention, mistral.MistralMLP, mistral.MistralRMSNorm, mistral.MistralRotaryEmbedding
        ),
    }


def check_supported(model_type: str) -> FamilyRules:
    if model_type not in RULES:
        raise UnsupportedTeacherError(
            f"teacher architecture {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(SUPPORTED_FAMILIES)} (SmolLM2 is 'llama')"
        )
    return RULES[model_type]


def family(model_type: str) -> Family:
    check_supported(model_type)
    return _modules()[model_type]


def attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) of the family's softmax attention, and so of a GDN mixer transferred from it."""
    rules = RULES[config.teacher_model_type]
    qkv = config.attention_bias if rules.qkv_bias is None else rules.qkv_bias
    o = config.attention_bias if rules.o_bias is None else rules.o_bias
    return qkv, o


def has_qk_norm(config) -> bool:
    return RULES[config.teacher_model_type].qk_norm
