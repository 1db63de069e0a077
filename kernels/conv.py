"""Depthwise causal 1-D convolution (the short conv in front of a GDN mixer), channels last."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., T, C], weight [C, W] -> y [..., T, C] with y_t = sum_j weight[:, j] * x_{t - (W-1) + j}.

    Positions before the start read zeros, so weight[..., -1] is the tap on the current token. A weight
    [L, 1, 1, C, W] against x [L, B, T, C] runs L convolutions at once (Stage 1's stacked mixers). Written as W shifted multiply-adds rather than F.conv1d: in the [B, T, C] layout the
    projections produce (no transposes), exact float32 products (cuDNN may run a float32 conv in TF32,
    ~1e-3 relative error against the decode step's window), and a form torch.compile fuses with the SiLU
    and the l2norm after it into one kernel, forward and backward (distill.model.gdn_mixer). The
    arithmetic is in the promoted dtype of x and weight (float32 for bf16 activations and float32 weights).
    """
    width = weight.shape[-1]
    seq_len = x.shape[-2]
    padded = F.pad(x, (0, 0, width - 1, 0))  # [..., T + W - 1, C]
    y = padded[..., :seq_len, :] * weight[..., 0]
    for j in range(1, width):
        y = y + padded[..., j : j + seq_len, :] * weight[..., j]
    return y
