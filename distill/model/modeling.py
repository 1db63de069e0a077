"""The hybrid causal LM in `transformers`: the teacher's network with some attention blocks
replaced by Gated DeltaNet mixers.

Weight names match the teacher's (`model.layers.{i}.self_attn.q_proj.weight`, `...mlp...`), except
that GDN layers hold `model.layers.{i}.linear_attn.*` instead of `self_attn.*`.
Caching reuses transformers' `DynamicCache(config=...)`, which reads `layer_types`: KV for
`full_attention` layers, conv + recurrent state for `linear_attention` layers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from distill.model.checkpoint import cast_state_dict, set_config_dtype, storage_dtype
from distill.model.config import FULL_ATTENTION, HybridConfig
from distill.model.families import family
from distill.model.gdn_mixer import GatedDeltaNet
from distill.model.remote_code import write_shim


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        fam = family(config.teacher_model_type)
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == FULL_ATTENTION:
            self.self_attn = fam.attention(config, layer_idx)
        else:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        self.mlp = fam.mlp(config)
        self.input_layernorm = fam.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = fam.norm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return self.self_attn if self.layer_type == FULL_ATTENTION else self.linear_attn

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.layer_type == FULL_ATTENTION:
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
        else:
            hidden_states, _ = self.linear_attn(hidden_states, attention_mask=padding_mask, past_key_values=past_key_values)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _is_stateful = True

    def save_pretrained(self, save_directory, *args, save_dtype: str | None = None, **kwargs) -> None:
        """Weights stored in the teacher's dtype unless `save_dtype` (or $HYBRID_SAVE_DTYPE) says otherwise."""
        dtype = storage_dtype(self.config.provenance, save_dtype)
        cast = dtype != self.dtype and kwargs.get("state_dict") is None
        if cast:
            kwargs["state_dict"] = cast_state_dict(self, dtype)
        super().save_pretrained(save_directory, *args, **kwargs)
        if cast:
            set_config_dtype(save_directory, dtype)
        write_shim(save_directory)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GatedDeltaNet):
            module.reset_gdn_parameters()
        elif type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight"):
            module.weight.fill_(1.0)


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = family(config.teacher_model_type).norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = family(config.teacher_model_type).rotary(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        causal_mask = self.causal_mask(inputs_embeds, position_ids, attention_mask, past_key_values)
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if padding_mask is not None and bool(padding_mask.all()):
            padding_mask = None

        all_hidden = [inputs_embeds] if output_hidden_states else None
        hidden_states = self.forward_from_layer(
            inputs_embeds, 0, position_ids, attention_mask=causal_mask, padding_mask=padding_mask,
            past_key_values=past_key_values, all_hidden=all_hidden, **kwargs,
        )
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )

    def causal_mask(self, inputs_embeds: torch.Tensor, position_ids: torch.LongTensor,
                    attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None):
        return create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

    def forward_from_layer(
        self,
        hidden_states: torch.Tensor,
        start: int,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        past_key_values=None,
        all_hidden: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The final normed hidden states, given `hidden_states` [B, T, H], the input of layer `start`.

        `forward` runs it from layer 0; layer selection from the first layer it changes (the layers
        below are shared by every candidate); bench/decode through its own static cache.
        `attention_mask` is the 4-D causal mask (None: the attention's own causal default);
        `all_hidden` collects each layer's output when given.
        """
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers[start:]:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                padding_mask=padding_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        return self.norm(hidden_states)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs) if labels is not None else None
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )
