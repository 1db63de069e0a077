"""Gated DeltaNet (GDN) recurrence: one API, three implementations.

The gated delta rule, per head, with state S in R^{K x V} (fla's layout: [B, H, K, V]):

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

Inputs use fla's "sequence-first" layout: q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H]
(g is the log-decay, <= 0). q and k are expected to be L2-normalised already.

The torch references (`naive_recurrent_gated_delta_rule` in float64, `torch_chunk_gated_delta_rule`,
`torch_recurrent_step`) live in kernels/gdn_reference.py and are re-exported here.
`chunk_gated_delta_rule` dispatches to flash-linear-attention's Triton kernels on CUDA when fla is
installed (with one backward kernel in torch where fla refuses it, kernels/gdn_fla.py), by an explicit
`backend=` choice or "auto"; `recurrent_gated_delta_rule` to our decode-step kernel
(kernels/gdn_decode.py) on CUDA, by an explicit `step=` choice or "auto"; both fall back to the torch
implementations elsewhere. Callers pass the choice down (the GDN mixer's `gdn_backend` and
`gdn_decode_step`); nothing here is patched from outside.
"""

from __future__ import annotations

import functools
import logging

import torch

from kernels.gdn_reference import naive_recurrent_gated_delta_rule, torch_chunk_gated_delta_rule, torch_recurrent_step

__all__ = [
    "l2norm",
    "naive_recurrent_gated_delta_rule",
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_step",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "fla_available",
    "GDN_BACKENDS",
    "GDN_DECODE_STEPS",
    "resolve_gdn_backend",
    "auto_cuda_backend",
    "describe_gdn_backend",
]

logger = logging.getLogger(__name__)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the same formula as fla and vLLM)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


@functools.cache
def fla_available() -> bool:
    """True when flash-linear-attention's Triton ops import and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:
        return False
    return True


def fla_backward_blocked(capability: tuple[int, int], triton_version: str) -> bool:
    """fla 0.6.0 refuses (raises in) its gated chunk_bwd_dqkwg on Hopper with 3.4 <= Triton < 3.7.1:
    Triton miscompiles it there (fla #640). Its other kernels run; see kernels/gdn_fla.py."""
    from packaging.version import Version

    return capability[0] == 9 and Version("3.4.0") <= Version(triton_version) < Version("3.7.1")


TRITON_DQKWG_CHECKED = ("3.6.0", "3.7.0")
"""Triton versions [from, to) where our chunk_bwd_dqkwg kernel was checked on Hopper, whole GDN path against
float64 in both head layouts and a training step timed (bench/results/dqkwg_triton_h100/)."""


@functools.cache  # resolved on every GDN call: parse the versions once
def auto_cuda_backend(capability: tuple[int, int], triton_version: str) -> str:
    """auto's path for 16-bit inputs on a CUDA device of `capability` with fla installed.

    fla's own kernels where fla trusts its backward; where it does not (Hopper, Triton < 3.7.1), our Triton
    chunk_bwd_dqkwg on the Triton versions it was checked on, else that kernel in torch (slower, right anywhere).
    """
    from packaging.version import Version

    if not fla_backward_blocked(capability, triton_version):
        return "fla"
    checked_from, checked_to = map(Version, TRITON_DQKWG_CHECKED)
    return "fla-triton-dqkwg" if checked_from <= Version(triton_version) < checked_to else "fla-torch-dqkwg"


GDN_BACKENDS = ("auto", "torch", "fla", "fla-torch-dqkwg", "fla-torch-dqkwg-wy", "fla-triton-dqkwg")
"""Prefill/training paths of `chunk_gated_delta_rule`:
- torch:              the pure-torch chunked form (CPU; float32 on CUDA; the slow reference path)
- fla:                fla's chunk_gated_delta_rule, every kernel Triton
- fla-torch-dqkwg:    fla's Triton kernels, with the backward kernel fla refuses on Hopper + Triton
                      < 3.7.1 (chunk_bwd_dqkwg) computed in torch (kernels/gdn_fla.py)
- fla-torch-dqkwg-wy: the same, and prepare_wy_repr_bwd in torch as well
- fla-triton-dqkwg:   fla's Triton kernels, with chunk_bwd_dqkwg by our Triton kernel that transposes no
                      tile in registers (kernels/gdn_dqkwg.py); right on an H100 with Triton 3.6 in both
                      head layouts, and a training step 1.14x (Stage 1) / 1.07x (Stage 2) faster than with
                      fla-torch-dqkwg (bench/results/dqkwg_triton_h100/)
- auto:               see `resolve_gdn_backend`"""


def resolve_gdn_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete path for `backend` on `device` with inputs of `dtype`.

    auto: torch off CUDA, without fla, or for float32 inputs (fla's tl.dot runs float32 operands as
    TF32, ~1e-3 relative error, while a float32 caller — a numerics check, a parity test — expects
    float32 arithmetic); on CUDA in 16-bit, `auto_cuda_backend`'s choice for the device and Triton.
    """
    if backend not in GDN_BACKENDS:
        raise ValueError(f"GDN backend must be one of {GDN_BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend != "torch" and not (device.type == "cuda" and fla_available()):
            raise RuntimeError(f"GDN backend {backend!r} needs CUDA and flash-linear-attention")
        return backend
    if device.type != "cuda" or not fla_available() or dtype == torch.float32:
        return "torch"
    import triton

    return auto_cuda_backend(torch.cuda.get_device_capability(device), triton.__version__)


def _fla_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("fla-core", "flash-linear-attention"):  # fla's code moved to fla-core in 0.5
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown version"


@functools.cache
def describe_gdn_backend(backend: str) -> str:
    """One line naming what a resolved backend runs (for logs and reports)."""
    if backend == "torch":
        return "torch: pure-torch chunked gated delta rule (forward + backward)"
    import triton

    versions = f"fla {_fla_version()}, Triton {triton.__version__}, {torch.cuda.get_device_name()}"
    if backend == "fla":
        return f"fla: flash-linear-attention Triton chunk kernels, forward + backward ({versions})"
    if backend == "fla-triton-dqkwg":
        where = "chunk_bwd_dqkwg by our Triton kernel without tl.trans (kernels/gdn_dqkwg.py)"
    else:
        where = "chunk_bwd_dqkwg" + (" and prepare_wy_repr_bwd" if backend.endswith("-wy") else "") + " in torch"
    return (f"{backend}: flash-linear-attention Triton chunk kernels, with {where} "
            f"(fla #640: miscompiled on Hopper with Triton < 3.7.1) ({versions})")


@functools.cache
def _log_backend_once(backend: str) -> None:
    logger.info("GDN chunk path: %s", describe_gdn_backend(backend))


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill / training, differentiable: (o [B, T, H, V], final state [B, H, K, V] fp32).

    `backend` picks the implementation (GDN_BACKENDS); "auto" resolves per device, dtype and the
    installed fla/Triton (`resolve_gdn_backend`). The path taken is logged once per process.
    `compiled`: the torch parts of the fla-torch-* backward run through torch.compile."""
    q, k, beta = q.to(v.dtype), k.to(v.dtype), beta.to(v.dtype)  # l2norm under autocast yields fp32
    resolved = resolve_gdn_backend(backend, q.device, v.dtype)
    _log_backend_once(resolved)
    if resolved == "torch":
        return torch_chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if resolved == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        return fla_chunk(
            q=q, k=k, v=v, g=g.float(), beta=beta, scale=scale,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=True,
        )
    from kernels.gdn_fla import BackwardParts, fla_chunk_gdn

    dqkwg = "triton" if resolved == "fla-triton-dqkwg" else "torch"
    parts = BackwardParts(dqkwg=dqkwg, wy_repr=resolved.endswith("-wy"), compiled=compiled)
    return fla_chunk_gdn(q, k, v, g, beta, scale, initial_state, parts)


GDN_DECODE_STEPS = ("auto", "triton", "torch")
"""Paths of `recurrent_gated_delta_rule`:
- auto:   our Triton decode step on CUDA for one token without autograd (on a float32 copy of the
          state), fla's fused recurrent kernel for other CUDA calls, the torch step elsewhere
- triton: our Triton decode step on the caller's state buffer itself, in place and in its own dtype,
          with one preallocated slot index per batch size (what a captured CUDA graph replays);
          calls of more than one token take the auto path
- torch:  `torch_recurrent_step`"""

_identity_slots: dict[tuple[int, torch.device], torch.Tensor] = {}


def _slots(batch: int, device: torch.device) -> torch.Tensor:
    """Slot index [0..batch) on `device`, created once per shape (before any CUDA graph capture)."""
    key = (batch, device)
    if key not in _identity_slots:
        _identity_slots[key] = torch.arange(batch, device=device, dtype=torch.int32)
    return _identity_slots[key]


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    step: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (a few tokens from a state): (o [B, T, H, V], new state). `step` picks the path
    (GDN_DECODE_STEPS). Our Triton step updates the state in place, ~1.1-1.35x faster than fla's
    (bench/results/kernels.md)."""
    if step not in GDN_DECODE_STEPS:
        raise ValueError(f"GDN decode step must be one of {GDN_DECODE_STEPS}, got {step!r}")
    if step == "torch":
        return torch_recurrent_step(q, k, v, g, beta, state, scale=scale)
    if step == "triton" and q.shape[1] == 1:
        from kernels.gdn_decode import gdn_decode_step

        slots = _slots(q.shape[0], q.device)
        o = gdn_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, slots, scale)
        return o[:, None], state
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, state))
    if q.is_cuda and q.shape[1] == 1 and not needs_grad:
        from kernels.gdn_decode import gdn_decode_step

        batch = q.shape[0]
        state = state.float().contiguous()
        slots = torch.arange(batch, device=q.device)
        o = gdn_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, slots, scale=scale)
        return o[:, None], state
    if q.is_cuda and fla_available():
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

        return fla_recurrent(
            q=q, k=k, v=v, g=g.float(), beta=beta, scale=scale,
            initial_state=state.float(), output_final_state=True,
        )
    return torch_recurrent_step(q, k, v, g, beta, state, scale=scale)
