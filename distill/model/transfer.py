"""Weight transfer in both directions: teacher -> hybrid (Stage 0) and back (restoring a teacher
attention block in chosen layers of a hybrid, Stage 2 and layer selection).

Everything but the token mixers of linear layers is copied by name. A GDN mixer takes the teacher's
W_q and W_o as they are, and W_k / W_v expanded head-wise to the query heads: query head h is paired
with KV head h // (Hq / Hkv), the pairing GQA attention uses. (Repeating rows instead of heads, as the
public reference code does, scrambles the pairing.) Biases come along where the teacher has them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.model.checkpoint import dtype_name
from distill.model.config import FULL_ATTENTION, TEACHER_FIELDS, HybridConfig
from distill.model.families import RULES, UnsupportedTeacherError, family
from distill.model.modeling import HybridForCausalLM


def hybrid_config_from_teacher(teacher_config, layer_types: list[str], provenance: dict | None = None) -> HybridConfig:
    family(teacher_config.model_type)  # raises a clear error for unsupported architectures
    if any(t == "sliding_attention" for t in getattr(teacher_config, "layer_types", None) or []):
        raise UnsupportedTeacherError(
            f"teacher {teacher_config.model_type!r} uses sliding-window attention layers, which are not supported yet"
        )
    fields = {name: getattr(teacher_config, name) for name in TEACHER_FIELDS if getattr(teacher_config, name, None) is not None}
    if RULES[teacher_config.model_type].fixed_biases:
        fields.pop("attention_bias", None)  # the family's rule (families.RULES) decides the biases
    return HybridConfig(
        teacher_model_type=teacher_config.model_type,
        layer_types=list(layer_types),
        provenance=dict(provenance or {}),
        architectures=["HybridForCausalLM"],
        **fields,
    )


def expand_kv_heads(weight: torch.Tensor, num_kv_heads: int, group: int) -> torch.Tensor:
    """[Hkv * D, ...] -> [Hkv * group * D, ...]: each KV head's block repeated for its `group` query heads."""
    per_head = weight.reshape(num_kv_heads, -1, *weight.shape[1:])
    return per_head.repeat_interleave(group, dim=0).reshape(-1, *weight.shape[1:])


@torch.no_grad()
def transfer_attention_to_gdn(attn: nn.Module, gdn: nn.Module, num_kv_heads: int, group: int) -> None:
    """Copy a teacher attention block's projections into a GDN mixer (head-wise GQA expansion)."""
    gdn.q_proj.weight.copy_(attn.q_proj.weight)
    gdn.k_proj.weight.copy_(expand_kv_heads(attn.k_proj.weight, num_kv_heads, group))
    gdn.v_proj.weight.copy_(expand_kv_heads(attn.v_proj.weight, num_kv_heads, group))
    gdn.o_proj.weight.copy_(attn.o_proj.weight)
    for name in ("q_proj", "k_proj", "v_proj"):
        teacher_bias, gdn_bias = getattr(attn, name).bias, getattr(gdn, name).bias
        if teacher_bias is not None and gdn_bias is not None:
            expanded = teacher_bias if name == "q_proj" else expand_kv_heads(teacher_bias, num_kv_heads, group)
            gdn_bias.copy_(expanded)
    if attn.o_proj.bias is not None and gdn.o_proj.bias is not None:
        gdn.o_proj.bias.copy_(attn.o_proj.bias)


@torch.no_grad()
def hybrid_from_teacher(
    teacher: PreTrainedModel, layer_types: list[str], provenance: dict | None = None, seed: int = 0
) -> HybridForCausalLM:
    """A hybrid with every shared weight copied from `teacher` and GDN mixers initialised from its attention."""
    provenance = dict(provenance or {})
    # the dtype the teacher is published in (load_teacher records it; a model built in memory has its own)
    provenance.setdefault("teacher_dtype", getattr(teacher, "checkpoint_dtype", None)
                          or dtype_name(next(teacher.parameters()).dtype))
    config = hybrid_config_from_teacher(teacher.config, layer_types, provenance)
    torch.manual_seed(seed)  # the new GDN parameters (gates, decay) are random
    hybrid = HybridForCausalLM(config).to(dtype=next(teacher.parameters()).dtype)
    copy_shared_weights(teacher, hybrid)
    group = config.num_attention_heads // config.num_key_value_heads
    for i in config.linear_layers:
        transfer_attention_to_gdn(
            teacher.model.layers[i].self_attn, hybrid.model.layers[i].linear_attn, config.num_key_value_heads, group
        )
    hybrid.config.provenance.setdefault("stages", []).append("stage0_transfer")
    return hybrid.eval()


@torch.no_grad()
def copy_shared_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy every parameter/buffer the two models share by name and shape; returns the names copied."""
    source_state = source.state_dict()
    copied = []
    for name, tensor in target.state_dict().items():
        if name in source_state and source_state[name].shape == tensor.shape:
            tensor.copy_(source_state[name])
            copied.append(name)
    return copied


@torch.no_grad()
def restore_softmax(model: HybridForCausalLM, teacher: nn.Module, softmax_layers: list[int]) -> HybridForCausalLM:
    """A copy of `model` whose layers `softmax_layers` hold the teacher's attention again.

    Cheaper than building a new hybrid (no random init of the whole network): the copy keeps every
    other weight of `model`, and each chosen layer's GDN mixer is swapped for a fresh attention block
    of the teacher's family loaded with the teacher's weights.
    """
    hybrid = copy.deepcopy(model)
    config = hybrid.config
    attention_cls = family(config.teacher_model_type).attention
    for i in softmax_layers:
        layer = hybrid.model.layers[i]
        if layer.layer_type == FULL_ATTENTION:
            continue
        attn = attention_cls(config, i)
        attn.load_state_dict(teacher.model.layers[i].self_attn.state_dict())
        param = next(layer.linear_attn.parameters())
        del layer.linear_attn
        layer.self_attn = attn.to(device=param.device, dtype=param.dtype)
        layer.layer_type = FULL_ATTENTION
        config.layer_types[i] = FULL_ATTENTION
    return hybrid
