"""`HybridConfig`: the teacher's architecture, which layers stay softmax, the GDN settings, provenance.

The config is flat on purpose: it carries the teacher's own fields (hidden_size, rope_parameters,
attention_bias, ...) under their usual names, so the teacher family's transformers modules and
vLLM's layers read it directly. The GDN field names are the ones vLLM's Qwen3-Next layer reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedConfig

from distill.model.families import SUPPORTED_FAMILIES, UnsupportedTeacherError
from distill.model.remote_code import AUTO_MAP

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
LAYER_TYPES = (FULL_ATTENTION, LINEAR_ATTENTION)


class LayerKinds:
    """Which layers are softmax and which GDN, for anything with a `layer_types` attribute."""

    @property
    def softmax_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

# The teacher config fields a hybrid keeps (any the teacher lacks fall back to the defaults below).
TEACHER_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias", "sliding_window",
)


class HybridConfig(LayerKinds, PreTrainedConfig):
    r"""Config of a softmax/Gated-DeltaNet hybrid distilled from a teacher.

    layer_types: one of "full_attention" (the teacher's softmax attention) or "linear_attention"
        (a Gated DeltaNet mixer) per decoder layer.
    linear_*: GDN head counts and sizes (defaults: the teacher's query heads and head_dim, so the
        teacher's q/k/v/o weights transfer head for head), conv kernel size.
    linear_conv_trainable: whether the short conv (initialised to identity) trains.
    provenance: where the weights came from: teacher, selection scores, stages run, token counts.
    """

    model_type = "hybrid_gdn"
    keys_to_ignore_at_inference = ["past_key_values"]

    teacher_model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = None

    layer_types: list[str] | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    linear_conv_trainable: bool = True
    provenance: dict | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [FULL_ATTENTION] * self.num_hidden_layers
        self.linear_num_key_heads = self.linear_num_key_heads or self.num_attention_heads
        self.linear_num_value_heads = self.linear_num_value_heads or self.linear_num_key_heads
        self.linear_key_head_dim = self.linear_key_head_dim or self.head_dim
        self.linear_value_head_dim = self.linear_value_head_dim or self.head_dim
        self.provenance = dict(self.provenance or {})
        super().__post_init__(**kwargs)
        self.auto_map = dict(AUTO_MAP)  # config.json -> the hybrid_gdn.py shim save_pretrained writes
        self._check()

    def _check(self) -> None:
        if self.teacher_model_type not in SUPPORTED_FAMILIES:
            raise UnsupportedTeacherError(
                f"teacher_model_type {self.teacher_model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_FAMILIES)})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, expected one per layer "
                f"(num_hidden_layers={self.num_hidden_layers})"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types contains {bad}; each entry must be one of {LAYER_TYPES}")
        if self.linear_num_value_heads != self.linear_num_key_heads:
            raise ValueError(
                "linear_num_value_heads must equal linear_num_key_heads "
                f"(got {self.linear_num_value_heads} and {self.linear_num_key_heads})"
            )

    # ---- views used across the project -------------------------------------------------------
    def cache_shape(self) -> CacheShape:
        return CacheShape.from_config(self)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token costs across all softmax layers (K and V)."""
        return self.cache_shape().kv_bytes_per_token(dtype_bytes)

    def state_bytes_per_sequence(self, dtype_bytes: int = 4, conv_dtype_bytes: int = 2) -> int:
        """Fixed recurrent-state bytes one sequence costs across all GDN layers (state + conv window)."""
        return self.cache_shape().state_bytes_per_sequence(dtype_bytes, conv_dtype_bytes)

    def memory_summary(self, context: int, kv_dtype_bytes: int = 2, state_dtype_bytes: int = 4) -> dict[str, Any]:
        """Cache bytes per sequence at a context length, for this hybrid and for its all-softmax teacher."""
        shape = self.cache_shape()
        teacher_kv = shape.kv_bytes_per_token(kv_dtype_bytes, all_layers=True) * context
        hybrid = shape.cache_bytes_per_sequence(context, kv_dtype_bytes, state_dtype_bytes)
        return {"context": context, "teacher_bytes": teacher_kv, "hybrid_bytes": hybrid, "ratio": teacher_kv / max(hybrid, 1)}


@dataclass(frozen=True)
class CacheShape(LayerKinds):
    """What one sequence's cache holds, and the one formula for its size in bytes.

    Softmax layers keep K and V (kv_heads x head_dim each) per token; GDN layers keep a fixed
    recurrent state (heads x key_dim x value_dim) and the short conv's window over q|k|v. vLLM keeps
    the conv's last `conv_kernel - 1` inputs; a cache that stores the whole window (the new token's
    slot too, as bench/decode's static cache does) passes `conv_slots=conv_kernel`.
    Built from a HybridConfig, a plain teacher config (all softmax) or a config.json dict.
    """

    layer_types: tuple[str, ...]
    kv_heads: int
    head_dim: int
    gdn_key_heads: int
    gdn_heads: int
    gdn_key_dim: int
    gdn_value_dim: int
    conv_kernel: int

    @classmethod
    def from_config(cls, config) -> CacheShape:
        def get(name: str):
            return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

        layers = get("num_hidden_layers")
        head_dim = get("head_dim") or get("hidden_size") // get("num_attention_heads")
        gdn_key_heads = get("linear_num_key_heads") or get("num_attention_heads")
        return cls(
            layer_types=tuple(get("layer_types") or [FULL_ATTENTION] * layers)
            if get("model_type") == HybridConfig.model_type else (FULL_ATTENTION,) * layers,
            kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            head_dim=head_dim,
            gdn_key_heads=gdn_key_heads,
            gdn_heads=get("linear_num_value_heads") or gdn_key_heads,
            gdn_key_dim=get("linear_key_head_dim") or head_dim,
            gdn_value_dim=get("linear_value_head_dim") or head_dim,
            conv_kernel=get("linear_conv_kernel_dim") or 4,
        )

    @property
    def conv_dim(self) -> int:
        """Channels of the short conv: q, k and v side by side."""
        return 2 * self.gdn_key_heads * self.gdn_key_dim + self.gdn_heads * self.gdn_value_dim

    def kv_bytes_per_token(self, dtype_bytes: int = 2, all_layers: bool = False) -> int:
        """K and V bytes one token costs across the softmax layers (every layer: the all-softmax teacher)."""
        layers = len(self.layer_types) if all_layers else len(self.softmax_layers)
        return 2 * self.kv_heads * self.head_dim * dtype_bytes * layers

    def recurrent_state_bytes_per_sequence(self, dtype_bytes: int = 4) -> int:
        """The GDN recurrent states of one sequence across all GDN layers (no conv window)."""
        return self.gdn_heads * self.gdn_key_dim * self.gdn_value_dim * dtype_bytes * len(self.linear_layers)

    def state_bytes_per_sequence(self, dtype_bytes: int = 4, conv_dtype_bytes: int = 2,
                                 conv_slots: int | None = None) -> int:
        """Fixed bytes one sequence costs across all GDN layers: recurrent state + conv window."""
        slots = self.conv_kernel - 1 if conv_slots is None else conv_slots
        conv = self.conv_dim * slots * conv_dtype_bytes * len(self.linear_layers)
        return self.recurrent_state_bytes_per_sequence(dtype_bytes) + conv

    def cache_bytes_per_sequence(self, context: int, kv_dtype_bytes: int = 2, state_dtype_bytes: int = 4,
                                 conv_dtype_bytes: int = 2, conv_slots: int | None = None) -> int:
        """All cache bytes of one sequence of `context` tokens."""
        return (self.kv_bytes_per_token(kv_dtype_bytes) * context
                + self.state_bytes_per_sequence(state_dtype_bytes, conv_dtype_bytes, conv_slots))
