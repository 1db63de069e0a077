"""The scale plan's memory rule (bench/scale_plan.py) against real models built on CPU, and the docs table
against the function that prints it.

Parameter counts are exact. Parameter + gradient + AdamW bytes match the rule within 0.5 % (AdamW keeps
one 4-byte `step` per tensor, which the rule leaves out). Activations cannot be measured on CPU: the rule's
ACT_BYTES is calibrated on the GPU measurement, and the check here is that it reproduces that measurement
and predicts the second measured shape within 25 %."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench import scale_plan
from distill.model.modeling import HybridForCausalLM
from distill.model.transfer import hybrid_config_from_teacher
from distill.placement import layer_types_for
from distill.stages import freeze_all_but_mixers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "scale-out.md"


def tiny_config(family: str, tied: bool):
    extra = {"attention_bias": False} if family == "qwen3" else {}
    return AutoConfig.for_model(
        family, vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra,
    )


def student_for(config, stage: int) -> HybridForCausalLM:
    L = config.num_hidden_layers
    softmax = scale_plan.stage_softmax_layers(L, stage)
    model = HybridForCausalLM(hybrid_config_from_teacher(config, layer_types_for(L, softmax)))
    if stage == 1:
        freeze_all_but_mixers(model)
    return model


def count(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False), ("qwen3", True), ("mistral", False)])
@pytest.mark.parametrize("stage", [1, 2])
def test_parameter_counts_are_exact(family, tied, stage):
    config = tiny_config(family, tied)
    teacher = AutoModelForCausalLM.from_config(config)
    student = student_for(config, stage)
    got = scale_plan.param_counts(config, stage)
    assert got.teacher == count(teacher.parameters())
    assert got.student == count(student.parameters())
    assert got.trainable == count(p for p in student.parameters() if p.requires_grad)
    assert got.teacher_layer == max(count(layer.parameters()) for layer in teacher.model.layers)
    assert got.student_layer == max(count(layer.parameters()) for layer in student.model.layers)


@pytest.mark.parametrize("stage", [1, 2])
def test_state_bytes_match_a_real_adamw_step(stage, one_thread):
    """fp32 weights, fp32 gradients of what trains, AdamW's two moments: TRAIN_BYTES / FROZEN_BYTES."""
    config = tiny_config("qwen2", tied=False)
    student = student_for(config, stage).float()
    trainable = [p for p in student.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    tensors = list(student.parameters()) + [p.grad for p in trainable]
    tensors += [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    p = scale_plan.param_counts(config, stage)
    rule = p.trainable * scale_plan.TRAIN_BYTES + (p.student - p.trainable) * scale_plan.FROZEN_BYTES
    assert measured == pytest.approx(rule, rel=5e-3)
    mem = scale_plan.memory_per_gpu(config, stage, 16, scale_plan.Settings(4, 1), act_bytes=0.0)
    assert mem.states == pytest.approx(rule / 4)


def test_calibration_reproduces_the_measurement_and_predicts_the_other_shape():
    for stage in (1, 2):
        act = scale_plan.calibrate_act_bytes(stage)
        for shape, tolerance in ((scale_plan.CALIBRATION_SHAPE, 1e-9), ("smollm2-135m", 0.25)):
            m = scale_plan.MEASURED[(stage, shape)]
            mem = scale_plan.memory_per_gpu(scale_plan.shape_config(shape), stage, m.seq,
                                            scale_plan.Settings(1, m.micro), act)
            assert mem.total / scale_plan.GIB == pytest.approx(m.peak_gib, rel=tolerance)
    # the FLOP count is the one bench/results/train_throughput.md reports MFU with (12.5 % and 24.6 %)
    assert scale_plan.measured_mfu(1) == pytest.approx(0.125, abs=1e-3)
    assert scale_plan.measured_mfu(2) == pytest.approx(0.246, abs=1e-3)


def test_docs_tables_are_the_generated_ones():
    blocks = {name: body for _, name, body, _ in scale_plan.DOCS_BLOCK.findall(DOCS.read_text())}
    generated = scale_plan.generated_blocks()
    assert set(blocks) == set(generated)
    for name, body in blocks.items():
        assert body == generated[name], f"docs/scale-out.md: the {name} table is stale; run python -m bench.scale_plan --update-docs docs/scale-out.md"
