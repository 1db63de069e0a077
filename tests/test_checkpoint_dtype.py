"""Checkpoints are stored in the teacher's dtype (bf16 teacher -> bf16 weights on disk, half the bytes), fp32 on
request; they load back with plain transformers and compute what the in-memory model computes in that dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import distill  # noqa: F401
from distill.cli import main
from distill.errors import UserError
from distill.model.checkpoint import SAVE_DTYPE_ENV, save_hybrid
from distill.model.teacher import load_teacher
from distill.model.transfer import hybrid_from_teacher
from tests.tiny_models import make_teacher

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def stored_dtypes(checkpoint) -> set[torch.dtype]:
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        return {f.get_tensor(name).dtype for name in f.keys()}


@pytest.fixture(scope="module")
def bf16_teacher(tmp_path_factory):
    """A tiny teacher published in bfloat16 (like SmolLM2)."""
    path = tmp_path_factory.mktemp("bf16-teacher")
    model, tokenizer = make_teacher("llama", num_layers=4)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hybrid_of_a_bf16_teacher_is_saved_in_bf16_and_loads_back(bf16_teacher, tmp_path):
    teacher, tokenizer = load_teacher(str(bf16_teacher))  # loaded in float32 for training
    assert next(teacher.parameters()).dtype == torch.float32 and teacher.checkpoint_dtype == "bfloat16"
    hybrid = hybrid_from_teacher(teacher, LAYER_TYPES)
    with torch.no_grad():  # training moves weights off the bf16 grid; the saved copy must round them
        for p in hybrid.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    out = save_hybrid(hybrid, tokenizer, tmp_path / "bf16")
    fp32 = save_hybrid(hybrid, tokenizer, tmp_path / "fp32", dtype="float32")
    assert stored_dtypes(out) == {torch.bfloat16} and stored_dtypes(fp32) == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["provenance"]["teacher_dtype"] == "bfloat16"
    size, size32 = (out / "model.safetensors").stat().st_size, (fp32 / "model.safetensors").stat().st_size
    assert 0.45 < size / size32 < 0.55
    assert next(hybrid.parameters()).dtype == torch.float32  # saving did not touch the model in memory

    ids = torch.randint(0, len(tokenizer), (2, 24))
    reference = hybrid.to(torch.bfloat16).float()  # the in-memory weights rounded as stored
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    exact = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32)
    assert exact.model.embed_tokens.weight.dtype == torch.float32
    # lm_head stays tied to the embeddings through the cast (one tensor on disk)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_fp32_teacher_keeps_fp32_and_the_environment_overrides(tmp_path, monkeypatch):
    teacher, tokenizer = make_teacher("llama", num_layers=4)
    hybrid = hybrid_from_teacher(teacher, LAYER_TYPES)
    assert hybrid.config.provenance["teacher_dtype"] == "float32"
    assert stored_dtypes(save_hybrid(hybrid, tokenizer, tmp_path / "a")) == {torch.float32}
    monkeypatch.setenv(SAVE_DTYPE_ENV, "bfloat16")
    assert stored_dtypes(save_hybrid(hybrid, tokenizer, tmp_path / "b")) == {torch.bfloat16}
    monkeypatch.setenv(SAVE_DTYPE_ENV, "int8")
    with pytest.raises(UserError, match="checkpoint dtype 'int8': expected auto or one of float32"):
        save_hybrid(hybrid, tokenizer, tmp_path / "c")


def test_init_saves_in_the_teachers_dtype_unless_told(bf16_teacher, tmp_path):
    assert main(["init", "--teacher", str(bf16_teacher), "--ratio", "0.5", "--out", str(tmp_path / "auto")]) == 0
    assert main(["init", "--teacher", str(bf16_teacher), "--ratio", "0.5", "--save-dtype", "float32",
                 "--out", str(tmp_path / "fp32")]) == 0
    assert stored_dtypes(tmp_path / "auto") == {torch.bfloat16}
    assert stored_dtypes(tmp_path / "fp32") == {torch.float32}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "auto").generate(
        torch.tensor([[5, 9, 2]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
