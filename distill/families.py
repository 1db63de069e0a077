"""Teacher families we can convert, and the transformers modules each one is built from.

A hybrid keeps the teacher's own softmax attention, MLP, norms and rotary embedding modules, so a
softmax layer computes exactly what the teacher computes (RoPE scaling variants, GQA, q/k/v biases,
Qwen3's q/k RMSNorm). Adding a family means adding one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distill.errors import UserError


class UnsupportedTeacherError(UserError):
    """The teacher's architecture is not one we know how to convert."""


@dataclass(frozen=True)
class Family:
    model_type: str
    attention: type[nn.Module]
    mlp: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]


def _families() -> dict[str, Family]:
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


SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def family(model_type: str) -> Family:
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedTeacherError(
            f"teacher architecture {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(SUPPORTED_FAMILIES)} (SmolLM2 is 'llama')"
        )
    return _families()[model_type]
