"""The hybrid architecture on tiny random teachers of every supported family."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import distill  # noqa: F401  (registers the Auto classes)
from distill.model.checkpoint import save_hybrid
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION
from distill.model.transfer import expand_kv_heads, hybrid_from_teacher
from distill.placement import layer_types_for
from tests.tiny_models import make_teacher

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
MIXED = [FULL_ATTENTION, LINEAR_ATTENTION, LINEAR_ATTENTION, FULL_ATTENTION]


def perturb_gdn(model, seed=0):
    """Move GDN parameters off their init (identity conv, etc.) so the checks see every path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "linear_attn" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def token_batch(vocab, batch=2, length=13, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_softmax_hybrid_reproduces_teacher_logits(family):
    teacher, _ = make_teacher(family)
    hybrid = hybrid_from_teacher(teacher, [FULL_ATTENTION] * teacher.config.num_hidden_layers)
    ids = token_batch(teacher.config.vocab_size)
    with torch.no_grad():
        diff = (hybrid(ids).logits - teacher(ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_matches_full_forward_with_padding(family):
    teacher, _ = make_teacher(family)
    hybrid = perturb_gdn(hybrid_from_teacher(teacher, MIXED))
    ids = token_batch(teacher.config.vocab_size, batch=3, length=14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as in batched generation
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prefill = 6
    with torch.no_grad():
        full = hybrid(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        cache = DynamicCache(config=hybrid.config)
        steps = [hybrid(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
                        past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(hybrid(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                                past_key_values=cache, use_cache=True).logits)
        stepped = torch.cat(steps, dim=1)
        # a padded row must also equal the same sequence run alone without padding
        alone = hybrid(ids[1:2, 4:], use_cache=False).logits
    real = mask.bool()
    assert (stepped - full)[real].abs().max().item() <= 1e-4
    assert (alone[0] - full[1, 4:]).abs().max().item() <= 1e-4


def test_batched_generate_with_padding_matches_single_sequence_generate():
    teacher, tokenizer = make_teacher("llama")
    hybrid = perturb_gdn(hybrid_from_teacher(teacher, MIXED))
    tokenizer.padding_side = "left"
    prompts = ["The quick brown fox", "A model"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = hybrid.generate(**batch, max_new_tokens=8, do_sample=False)
        for row, prompt in enumerate(prompts):
            single = tokenizer(prompt, return_tensors="pt")
            alone = hybrid.generate(**single, max_new_tokens=8, do_sample=False)
            assert together[row, -8:].tolist() == alone[0, -8:].tolist()


def test_transfer_pairs_query_head_h_with_kv_head_h_over_group():
    teacher, _ = make_teacher("llama", heads=4, kv_heads=2)
    hybrid = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * teacher.config.num_hidden_layers)
    attn, gdn = teacher.model.layers[1].self_attn, hybrid.model.layers[1].linear_attn
    heads, kv_heads, head_dim = 4, 2, teacher.config.head_dim
    group = heads // kv_heads
    x = torch.randn(5, teacher.config.hidden_size)
    with torch.no_grad():
        k_teacher = attn.k_proj(x).view(5, kv_heads, head_dim)
        v_teacher = attn.v_proj(x).view(5, kv_heads, head_dim)
        k_gdn = gdn.k_proj(x).view(5, heads, head_dim)
        v_gdn = gdn.v_proj(x).view(5, heads, head_dim)
        q_gdn, q_teacher = gdn.q_proj(x), attn.q_proj(x)
    for h in range(heads):
        torch.testing.assert_close(k_gdn[:, h], k_teacher[:, h // group], rtol=0, atol=0)
        torch.testing.assert_close(v_gdn[:, h], v_teacher[:, h // group], rtol=0, atol=0)
    torch.testing.assert_close(q_gdn, q_teacher, rtol=0, atol=0)
    # the reference code's row-repeat pairs head h with KV head h % Hkv: this test must tell them apart
    assert not torch.allclose(k_gdn[:, 1], k_teacher[:, 1 % kv_heads])


def test_expand_kv_heads_keeps_bias_blocks_together():
    bias = torch.arange(6.0)  # 2 KV heads x head_dim 3
    assert expand_kv_heads(bias, num_kv_heads=2, group=2).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


def test_qwen2_biases_are_transferred():
    teacher, _ = make_teacher("qwen2")
    hybrid = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * teacher.config.num_hidden_layers)
    gdn, attn = hybrid.model.layers[0].linear_attn, teacher.model.layers[0].self_attn
    torch.testing.assert_close(gdn.q_proj.bias, attn.q_proj.bias)
    torch.testing.assert_close(gdn.k_proj.bias, expand_kv_heads(attn.k_proj.bias, 2, 2))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_load_round_trip_is_exact(tmp_path, family):
    teacher, tokenizer = make_teacher(family)
    hybrid = perturb_gdn(hybrid_from_teacher(teacher, MIXED, provenance={"teacher": "tiny"}))
    save_hybrid(hybrid, tokenizer, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["layer_types"] == MIXED
    assert config["model_type"] == "hybrid_gdn"
    assert list((tmp_path / "ckpt").glob("*.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded).__name__ == "HybridForCausalLM"
    for (name, a), (_, b) in zip(hybrid.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = token_batch(teacher.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(hybrid(ids).logits, loaded(ids).logits)


def test_layer_types_for_uniform_placement():
    from distill.placement import k_from_ratio, uniform_softmax_layers

    assert k_from_ratio(0.25, 30) == 8  # round half up of 7.5
    layers = uniform_softmax_layers(30, 8)
    assert len(layers) == 8 and layers == sorted(layers)
    assert layer_types_for(4, [1]) == [LINEAR_ATTENTION, FULL_ATTENTION, LINEAR_ATTENTION, LINEAR_ATTENTION]


def test_state_and_kv_bytes():
    teacher, _ = make_teacher("llama")
    config = hybrid_from_teacher(teacher, MIXED).config
    assert config.kv_bytes_per_token(2) == 2 * 2 * 16 * 2 * 2  # K+V, 2 KV heads, head_dim 16, bf16, 2 layers
    state = 4 * 16 * 16 * 4  # heads x Dk x Dv x fp32
    conv = (2 * 64 + 64) * 3 * 2  # conv channels x (width - 1) x bf16
    assert config.state_bytes_per_sequence() == 2 * (state + conv)


def test_our_kernels_package_does_not_look_like_hf_kernels():
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()
