"""GDN backend choice: explicit, resolved per device/dtype, set per model; CPU always runs torch."""

from __future__ import annotations

import pytest
import torch

from kernels.gdn import (GDN_BACKENDS, auto_cuda_backend, chunk_gated_delta_rule, resolve_gdn_backend,
                         torch_chunk_gated_delta_rule)


def test_auto_is_torch_on_cpu_and_for_float32():
    assert resolve_gdn_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"
    assert resolve_gdn_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert resolve_gdn_backend("torch", torch.device("cpu"), torch.float32) == "torch"


@pytest.mark.parametrize("capability, triton_version, expected", [
    ((9, 0), "3.6.0", "fla-triton-dqkwg"),  # fla refuses its backward; our kernel was checked here
    ((9, 0), "3.6.1", "fla-triton-dqkwg"),
    ((9, 0), "3.5.1", "fla-torch-dqkwg"),   # refused by fla, our kernel never checked on this Triton
    ((9, 0), "3.7.0", "fla-torch-dqkwg"),
    ((9, 0), "3.7.1", "fla"),               # fla's Hopper guard lifts
    ((9, 0), "3.3.1", "fla"),
    ((8, 0), "3.6.0", "fla"),               # not Hopper
    ((10, 0), "3.6.0", "fla"),
])
def test_auto_on_cuda_never_picks_a_refused_or_unchecked_kernel(capability, triton_version, expected):
    assert auto_cuda_backend(capability, triton_version) == expected


def test_fla_backends_refused_without_cuda():
    for name in GDN_BACKENDS:
        if name.startswith("fla"):
            with pytest.raises(RuntimeError):
                resolve_gdn_backend(name, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_gdn_backend("triton", torch.device("cpu"), torch.bfloat16)


def test_explicit_torch_backend_matches_torch_form():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(2, 70, 3, 8, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(2, 70, 3, 8, generator=gen)
    g, beta = -torch.rand(2, 70, 3, generator=gen), torch.rand(2, 70, 3, generator=gen)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, backend="torch")
    o_ref, s_ref = torch_chunk_gated_delta_rule(q, k, v, g, beta)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


def test_set_gdn_backend_reaches_every_mixer():
    from distill.model.config import LINEAR_ATTENTION
    from distill.model.gdn_mixer import GatedDeltaNet, set_gdn_backend
    from distill.model.transfer import hybrid_from_teacher
    from tests.tiny_models import make_teacher

    teacher, _ = make_teacher()
    model = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * teacher.config.num_hidden_layers)
    count = set_gdn_backend(model, "torch")
    mixers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    assert count == len(mixers) > 0 and all(m.gdn_backend == "torch" for m in mixers)
    with pytest.raises(ValueError):
        set_gdn_backend(model, "nope")


def test_parallel_gdn_backend_reaches_every_trained_mixer_and_bad_values_are_refused():
    from distill.distributed import ParallelConfig, Runtime
    from distill.errors import UserError
    from distill.model.config import LINEAR_ATTENTION
    from distill.model.gdn_mixer import GatedDeltaNet
    from distill.model.transfer import hybrid_from_teacher
    from distill.pipeline import log_gdn_path
    from distill.presets import get_preset
    from distill.sharding import WholeModel
    from tests.tiny_models import make_teacher

    teacher, _ = make_teacher()
    model = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * teacher.config.num_hidden_layers)
    runtime = Runtime(parallel=get_preset("demo", ["parallel.gdn_backend=torch"]).parallel)
    WholeModel(model, lambda m, batch: (None, {}), [], runtime)
    assert {m.gdn_backend for m in model.modules() if isinstance(m, GatedDeltaNet)} == {"torch"}
    assert "torch: pure-torch" in log_gdn_path(runtime)

    with pytest.raises(UserError, match="parallel.gdn_backend must be one of"):
        ParallelConfig(gdn_backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_an_fla_gdn_backend_without_cuda_is_a_clear_error_before_training():
    from distill.distributed import ParallelConfig, Runtime
    from distill.errors import UserError
    from distill.pipeline import log_gdn_path

    with pytest.raises(UserError, match="parallel.gdn_backend=fla-triton-dqkwg: .*needs CUDA"):
        log_gdn_path(Runtime(parallel=ParallelConfig(gdn_backend="fla-triton-dqkwg")))
