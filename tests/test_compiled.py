"""The compiled training path (distill.model.compiled) computes what the eager one does.

On one GPU it is on by default (`parallel.compile=auto`); here (`=on`) it runs through inductor's CPU backend,
which compiles the same graphs to C++ instead of Triton, so the checks are of the graphs dynamo
captures and AOTAutograd differentiates: losses and every gradient against eager float32.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from distill.distributed import ParallelConfig, Runtime
from distill.errors import UserError
from distill.model.compiled import set_compiled
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION
from distill.model.transfer import hybrid_from_teacher
from distill.presets import get_preset
from kernels.conv import causal_conv1d
from tests.test_hybrid_model import perturb_gdn, token_batch
from tests.tiny_models import make_teacher


@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 5, 17])
def test_causal_conv1d_is_the_depthwise_conv_in_float64(seq_len):
    gen = torch.Generator().manual_seed(seq_len)
    x = torch.randn(2, seq_len, 6, generator=gen, dtype=torch.float64)  # [B, T, C]
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)  # [C, W]
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), weight[:, None], groups=6).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d(x, weight), expected, rtol=1e-12, atol=1e-12)


def gradients_of_a_training_step(model, ids, compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    set_compiled(model, compiled)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    set_compiled(model, False)
    return loss.detach(), grads


def test_compiled_training_step_matches_eager_loss_and_every_gradient():
    teacher, tokenizer = make_teacher("qwen2", num_layers=4)  # q/k/v biases: the fused projection's bias path too
    hybrid = perturb_gdn(hybrid_from_teacher(teacher, [FULL_ATTENTION, LINEAR_ATTENTION, LINEAR_ATTENTION, LINEAR_ATTENTION]))
    hybrid.train()
    ids = token_batch(len(tokenizer), batch=2, length=19)

    eager_loss, eager = gradients_of_a_training_step(hybrid, ids, compiled=False)
    compiled_loss, compiled = gradients_of_a_training_step(hybrid, ids, compiled=True)

    assert counters["frames"]["ok"] > 0  # dynamo did capture graphs: the comparison is not eager against eager
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled.keys() == eager.keys()
    assert any(".linear_attn.conv1d." in name for name in eager)  # the conv's own gradient is checked too
    for name, grad in eager.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (compiled[name] - grad).abs().max() / scale < 1e-4, name


def test_compiled_teacher_forward_matches_eager():
    teacher, tokenizer = make_teacher("llama", num_layers=2)
    ids = token_batch(len(tokenizer), batch=2, length=11)
    with torch.no_grad():
        eager = teacher(input_ids=ids).logits
        assert set_compiled(teacher, True) == 2 * 2 + 2 + 1  # per layer: two norms and the MLP; the final norm
        compiled = teacher(input_ids=ids).logits
        set_compiled(teacher, False)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_speed_switches_are_on_for_one_cuda_process_and_settable():
    """compile and cuda_graph default to "auto": on for one CUDA process (where they were measured to pay),
    off on the CPU, under torchrun and with activation checkpointing; true/false read as on/off."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for switch in ("compile", "cuda_graph"):
        assert Runtime(device=cuda).uses(switch)
        assert not Runtime(device=cpu).uses(switch)
        assert not Runtime(device=cuda, world=2).uses(switch)
        assert not Runtime(device=cuda, parallel=ParallelConfig(activation_checkpointing=True)).uses(switch)
        assert not Runtime(device=cuda, parallel=get_preset("demo", [f"parallel.{switch}=off"]).parallel).uses(switch)
        assert Runtime(device=cpu, parallel=get_preset("demo", [f"parallel.{switch}=true"]).parallel).uses(switch)
        assert get_preset("demo", [f"parallel.{switch}=False"]).parallel == replace(ParallelConfig(), **{switch: "off"})
        with pytest.raises(UserError, match=rf"parallel.{switch} must be one of auto, on, off \(or true/false\), got 'yes-please'"):
            get_preset("demo", [f"parallel.{switch}=yes-please"])


def test_the_run_log_says_how_each_step_runs(caplog):
    """`hybrid convert` logs the GDN path and each speed switch's state, and how to flip the ones that are off."""
    from distill.cuda_graph import WARMUP
    from distill.pipeline import describe_training_step, log_gdn_path

    on_gpu = describe_training_step(Runtime(device=torch.device("cuda")))
    assert list(on_gpu.values()) == ["compiled (torch.compile)", f"replayed from a CUDA graph after {WARMUP} eager ones",
                                     "stacked, one batched computation"]
    with caplog.at_level("INFO", logger="distill.pipeline"):
        log_gdn_path(Runtime())
    text = caplog.text
    assert "GDN chunk path (training and prefill): torch" in text
    assert "elementwise work (norms, MLPs, the GDN conv/gate chain): eager (parallel.compile=on compiles it)" in text
    assert "optimiser steps: launched op by op (parallel.cuda_graph=on replays" in text
    assert "Stage 1 mixers: one after another (faster on a CPU" in text


def test_a_deep_copy_of_a_compiled_model_runs_its_own_weights():
    """Stage 2 deep-copies the model it shards, selection each candidate: a copy must not call the original."""
    import copy

    teacher, tokenizer = make_teacher("llama", num_layers=2)
    hybrid = perturb_gdn(hybrid_from_teacher(teacher, [LINEAR_ATTENTION, FULL_ATTENTION]))
    set_compiled(hybrid, True)
    clone = copy.deepcopy(hybrid)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if "norm" in name or ".mlp." in name:
                p.mul_(1.5)
        ids = token_batch(len(tokenizer), batch=1, length=7)
        changed = clone(input_ids=ids).logits
        set_compiled(clone, False)
        torch.testing.assert_close(changed, clone(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(changed, hybrid(input_ids=ids).logits, atol=1e-3)


def test_cuda_graph_steps_need_one_cuda_process(tmp_path):
    """The captured step (distill.cuda_graph) is a CUDA feature; asked for on the CPU, the stage says so at once."""
    import dataclasses

    from distill.distributed import ParallelConfig
    from distill.train import TrainConfig, train

    model = torch.nn.Linear(3, 1)
    runtime = dataclasses.replace(Runtime(), parallel=ParallelConfig(cuda_graph="on"))
    with pytest.raises(UserError, match="parallel.cuda_graph needs one process on a CUDA device"):
        train("t", model, [{"params": list(model.parameters()), "lr": 1e-3}], lambda m, b: (m(b).sum(), {}),
              lambda step, micro: torch.randn(2, 3), TrainConfig(steps=1, batch=2, micro_batch=2), tmp_path, runtime)
