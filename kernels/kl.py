"""Full-vocabulary KL(teacher || student) fused with both lm_heads, for Stage-2 distillation.

    loss = 1/N sum_n KL(p_t[n] || p_s[n]),   p_t = softmax(h_t W_t^T / T),  p_s = softmax(h_s W_s^T / T)
    d loss / d z_s[n, v] = (p_s[n, v] - p_t[n, v]) / (T N)       (z_s = h_s W_s^T, the student logits)

Materialising [tokens x vocab] logits twice costs tens of GiB at Stage-2 sizes (16K tokens x 152K
vocab: 10 GB per fp32 copy). `fused_linear_kl` never does: the forward pass walks over chunks of C
tokens (`chunk_tokens`), and each chunk over sub-chunks of C/4 tokens:

    1. z_s, z_t = h_s W_s^T, h_t W_t^T               [C/4, V] fp32: bf16 GEMMs with fp32 output
    2. per row: logsumexp of both, the KL, and dz = (p_s - p_t) / (T N) into the chunk's
       [C, V] buffer in the input dtype (one Triton kernel on CUDA, two passes over the row)
    3. once per chunk: grad_hidden[chunk] = dz W_s              [C, Hs]
                       grad_weight       += dz^T h_s[chunk]      [V, Hs], accumulated in fp32

so the forward pass already holds both gradients and backward only scales them by the incoming
gradient (the trick Liger-Kernel uses). Logits stay fp32 end to end: rounding them to bf16 (what a
plain bf16 `h @ W.T` does) perturbs each probability by ~0.4%, which is as large as p_s - p_t itself
once the student is close to the teacher (KL ~ 2e-3: ~30% gradient error for naive torch and fla,
measured in bench/results/kernels.md). The gradient GEMMs want many tokens per call (the fp32
weight-gradient accumulator is read and written once per chunk); the fp32 logits, 8 bytes per
token and vocabulary entry for the pair, want few: hence the two chunk sizes.
Extra memory: the fp32 [V, Hs] accumulator, the [C, V] dz buffer and two [C/4, V] fp32 logit
buffers; `chunk_tokens=None` sizes C to keep the total under `MEMORY_BUDGET_BYTES`.

`naive_kl` is the textbook formula (full logits, log_softmax in fp32); run it in float64 as the reference.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still get the torch path
    triton = None

__all__ = ["fused_linear_kl", "naive_kl", "auto_chunk_tokens", "MEMORY_BUDGET_BYTES"]

# Extra memory the fused path aims to stay under (fp32 weight-grad accumulator + chunk buffers).
MEMORY_BUDGET_BYTES = int(1.8 * 2**30)
# Larger chunk buffers than this pay little on an H100 (bench/results/kernels.md, 16K tokens x 49K
# vocab: 13.2 ms at 0.50 GiB extra, 12.2 ms at 0.87 GiB).
CHUNK_BUFFER_BYTES = 640 * 2**20
LOGIT_SUBCHUNKS = 4  # fp32 logits are computed for chunk_tokens / 4 tokens at a time
_MIN_CHUNK_TOKENS = 128
_MAX_CHUNK_TOKENS = 8192


def naive_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """mean_n KL(softmax(z_t[n] / T) || softmax(z_s[n] / T)), with full [N, V] logits (fp32 or wider)."""
    acc_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    log_p_s = ((student_hidden @ student_weight.T).to(acc_dtype) / temperature).log_softmax(-1)
    log_p_t = ((teacher_hidden @ teacher_weight.T).to(acc_dtype) / temperature).log_softmax(-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------
# Step 2: per-row KL and logit gradient, written over the student logits.
# ----------------------------------------------------------------------------------------------


def _kl_rows_torch(
    z_s: torch.Tensor, z_t: torch.Tensor, dz: torch.Tensor, temperature: float, grad_scale: float
) -> torch.Tensor:
    """z_s, z_t [C, V] logits. Returns the KL of each row [C] (fp32, or fp64 for fp64 logits) and
    writes grad_scale * (p_s - p_t) into dz [C, V] (any float dtype)."""
    acc_dtype = torch.promote_types(z_s.dtype, torch.float32)
    log_p_s = (z_s.to(acc_dtype) / temperature).log_softmax(-1)
    log_p_t = (z_t.to(acc_dtype) / temperature).log_softmax(-1)
    p_t = log_p_t.exp()
    dz.copy_((log_p_s.exp() - p_t) * grad_scale)
    return (p_t * (log_p_t - log_p_s)).sum(-1)


if triton is not None:

    @triton.jit
    def _online_softmax_step(m, l, x):
        """One online-softmax step per lane with a single exp: returns (m', l', exp(m - m'), exp(x - m'))."""
        d = tl.exp(-tl.abs(x - m))
        x_is_new_max = x > m
        rescale = tl.where(x_is_new_max, d, 1.0)
        e = tl.where(x_is_new_max, 1.0, d)
        return tl.maximum(m, x), l * rescale + e, rescale, e

    @triton.jit
    def _kl_rows_kernel(
        zs_ptr,  # [C, V] student logits
        zt_ptr,  # [C, V] teacher logits
        dz_ptr,  # [C, V] out: grad_scale * (p_s - p_t)
        row_kl_ptr,  # [C] fp32 out
        V,
        stride_zs,
        stride_zt,
        stride_dz,
        inv_temp,
        grad_scale,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        zs_row = zs_ptr + row * stride_zs
        zt_row = zt_ptr + row * stride_zt
        cols = tl.arange(0, BLOCK_V)

        # Pass 1: per-lane online softmax statistics of both rows, in fp32. Lanes start at a finite
        # floor so that a lane that only ever sees masked (-inf) columns keeps sum 0 without NaNs.
        m_s = tl.full([BLOCK_V], -1.0e30, tl.float32)
        m_t = tl.full([BLOCK_V], -1.0e30, tl.float32)
        l_s = tl.zeros([BLOCK_V], tl.float32)
        l_t = tl.zeros([BLOCK_V], tl.float32)
        a_t = tl.zeros([BLOCK_V], tl.float32)  # sum_v exp(x_t - m_t) * (x_t - x_s)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x_s = tl.load(zs_row + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            x_t = tl.load(zt_row + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            diff = x_t - x_s  # 0 on masked columns, where e_t is 0 too
            m_s, l_s, _, _ = _online_softmax_step(m_s, l_s, tl.where(mask, x_s, float("-inf")))
            m_t, l_t, rescale_t, e_t = _online_softmax_step(m_t, l_t, tl.where(mask, x_t, float("-inf")))
            a_t = a_t * rescale_t + e_t * diff

        max_s = tl.max(m_s, axis=0)
        max_t = tl.max(m_t, axis=0)
        sum_t = tl.sum(l_t * tl.exp(m_t - max_t), axis=0)
        lse_s = max_s + tl.log(tl.sum(l_s * tl.exp(m_s - max_s), axis=0))
        lse_t = max_t + tl.log(sum_t)
        # KL = sum_v p_t (x_t - x_s) - lse_t + lse_s
        kl = tl.sum(a_t * tl.exp(m_t - max_t), axis=0) / sum_t - lse_t + lse_s
        tl.store(row_kl_ptr + row, kl)

        # Pass 2: the logit gradient.
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x_s = tl.load(zs_row + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            x_t = tl.load(zt_row + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
            dz = (tl.exp(x_s - lse_s) - tl.exp(x_t - lse_t)) * grad_scale
            tl.store(dz_ptr + row * stride_dz + start + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _kl_rows_triton(
    z_s: torch.Tensor, z_t: torch.Tensor, dz: torch.Tensor, temperature: float, grad_scale: float
) -> torch.Tensor:
    """Same contract as `_kl_rows_torch`: one Triton program per row, fp32 arithmetic."""
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    rows, vocab = z_s.shape
    assert z_s.stride(1) == z_t.stride(1) == dz.stride(1) == 1, "rows must be contiguous"
    row_kl = torch.empty(rows, dtype=torch.float32, device=z_s.device)
    block_v = min(2048, triton.next_power_of_2(vocab))
    _kl_rows_kernel[(rows,)](
        z_s, z_t, dz, row_kl, vocab, z_s.stride(0), z_t.stride(0), dz.stride(0), 1.0 / temperature, grad_scale,
        BLOCK_V=block_v, num_warps=8,
    )
    return row_kl


_KL_ROWS = {"torch": _kl_rows_torch, "triton": _kl_rows_triton}


# ----------------------------------------------------------------------------------------------
# Steps 1 and 3: matmuls and gradient accumulation.
# ----------------------------------------------------------------------------------------------

_cuda_out_dtype_works: bool | None = None  # torch.mm/addmm(out_dtype=fp32), probed on first use


def _fp32_product(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in fp32 without rounding the product to a's dtype; added into acc when given.

    bf16/fp16 operands on CUDA go through cuBLAS with an fp32 output (`out_dtype=torch.float32`,
    torch >= 2.8), keeping the tensor cores; elsewhere (or without out_dtype) the product is
    computed in the operands' dtype and then widened.
    """
    global _cuda_out_dtype_works
    if a.dtype.itemsize < 4 and a.is_cuda and _cuda_out_dtype_works is not False:
        try:
            if acc is None:
                result = torch.mm(a, b, out_dtype=torch.float32)
            else:
                result = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _cuda_out_dtype_works = True
            return result
        except (RuntimeError, TypeError):
            _cuda_out_dtype_works = False
    if acc is None:
        return (a @ b).to(torch.promote_types(a.dtype, torch.float32))
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    return acc.add_(a @ b)


def auto_chunk_tokens(
    num_tokens: int, vocab: int, student_hidden_size: int, grad_bytes: int, need_grad_weight: bool
) -> int:
    """Largest power of two of tokens whose buffers (dz [C, V] in `grad_bytes` per element, two fp32
    [C / LOGIT_SUBCHUNKS, V] logit blocks) fit beside the fp32 weight gradient, within CHUNK_BUFFER_BYTES.

    Powers of two keep the logit GEMMs on whole tiles: on an H100, 3,328-token chunks (832-row
    logit blocks) ran 14.9 ms where 2,048 ran 13.2 ms (bench/results/kernels.md)."""
    fixed = 4 * vocab * student_hidden_size if need_grad_weight else 0
    room = min(max(MEMORY_BUDGET_BYTES - fixed, 0), CHUNK_BUFFER_BYTES)
    chunk = int(room // (vocab * (grad_bytes + 2 * 4 / LOGIT_SUBCHUNKS)))
    chunk = 2 ** max(chunk, 1).bit_length() // 2  # round down to a power of two
    return min(max(_MIN_CHUNK_TOKENS, min(_MAX_CHUNK_TOKENS, chunk)), num_tokens)


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if impl not in _KL_ROWS:
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return impl


def _kl_and_grads(
    h_s: torch.Tensor,  # [N, Hs]
    w_s: torch.Tensor,  # [V, Hs]
    h_t: torch.Tensor,  # [N, Ht]
    w_t: torch.Tensor,  # [V, Ht]
    temperature: float,
    chunk_tokens: int | None,
    impl: str,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (loss scalar, grad_hidden [N, Hs] or None, grad_weight [V, Hs] or None).

    The loss and the weight-gradient accumulator are fp32 (fp64 for fp64 inputs)."""
    num_tokens, vocab = h_s.shape[0], w_s.shape[0]
    impl = _resolve_impl(impl, h_s.device)
    kl_rows = _KL_ROWS[impl]
    # GPU: matmuls on the input dtype (bf16 tensor cores) with fp32 logits and fp32 weight-grad sums.
    # CPU: everything in fp32 (CPU half-precision matmuls are slow and round more).
    if h_s.device.type != "cuda":
        h_s, w_s, h_t, w_t = (x.float() if x.dtype.itemsize < 4 else x for x in (h_s, w_s, h_t, w_t))
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(num_tokens, vocab, h_s.shape[1], h_s.element_size(), need_grad_weight)
    chunk_tokens = min(chunk_tokens, num_tokens)

    acc_dtype = torch.promote_types(h_s.dtype, torch.float32)
    row_kl = torch.empty(num_tokens, dtype=acc_dtype, device=h_s.device)
    grad_hidden = torch.empty_like(h_s) if need_grad_hidden else None
    grad_weight = torch.zeros(w_s.shape, dtype=acc_dtype, device=w_s.device) if need_grad_weight else None
    dz_buffer = torch.empty(chunk_tokens, vocab, dtype=h_s.dtype, device=h_s.device)
    logit_tokens = max(1, chunk_tokens // LOGIT_SUBCHUNKS)
    grad_scale = 1.0 / (temperature * num_tokens)
    for start in range(0, num_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, num_tokens)
        dz = dz_buffer[: stop - start]  # [C, V]
        for sub in range(start, stop, logit_tokens):
            rows = slice(sub, min(sub + logit_tokens, stop))
            z_s = _fp32_product(h_s[rows], w_s.T)  # [C/4, V] fp32
            z_t = _fp32_product(h_t[rows], w_t.T)
            row_kl[rows] = kl_rows(z_s, z_t, dz[rows.start - start : rows.stop - start], temperature, grad_scale)
            del z_s, z_t
        if grad_hidden is not None:
            torch.mm(dz, w_s, out=grad_hidden[start:stop])
        if grad_weight is not None:
            _fp32_product(dz.T, h_s[start:stop], acc=grad_weight)
    return row_kl.sum() / num_tokens, grad_hidden, grad_weight


class _FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, temperature, chunk_tokens, impl, grad_enabled):
        need_grad_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_grad_weight = grad_enabled and ctx.needs_input_grad[1]
        with torch.no_grad():
            loss, grad_hidden, grad_weight = _kl_and_grads(
                h_s.detach(), w_s.detach(), h_t.detach(), w_t.detach(), temperature, chunk_tokens, impl,
                need_grad_hidden, need_grad_weight,
            )
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(h_s.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(w_s.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The gradients were computed in forward; scale them in place (backward runs once).
        grad_hidden, grad_weight = ctx.saved_tensors
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """mean over tokens of KL(softmax(h_t W_t^T / T) || softmax(h_s W_s^T / T)), never materialising [N, V].

    student_hidden [N, Hs], student_weight [V, Hs], teacher_hidden [N, Ht], teacher_weight [V, Ht].
    Differentiable w.r.t. the student's hidden states and weight; the teacher's are constants.
    The loss is an fp32 scalar (fp64 for fp64 inputs); under torch.no_grad() no gradient is computed.
    chunk_tokens: tokens per gradient GEMM (None: sized by `auto_chunk_tokens`). impl: "auto"
    (Triton on CUDA, torch elsewhere), "torch", or "triton" (CPU tensors only under TRITON_INTERPRET=1).
    Backward may run once per forward (it scales the stored gradients in place).
    """
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError("hidden states must be [tokens, hidden]; flatten batch and sequence first")
    if student_hidden.shape[0] != teacher_hidden.shape[0] or student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError("student and teacher must agree on tokens and vocabulary size")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _FusedLinearKL.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, chunk_tokens, impl,
        torch.is_grad_enabled(),
    )
