"""Depthwise causal 1-D convolution (the short conv in front of a GDN mixer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, C, T], weight [C, 1, W] -> y [B, C, T] with y_t = sum_j weight[:, 0, j] * x_{t - (W-1) + j}.

    Positions before the start read zeros, so weight[..., -1] is the tap on the current token.
    float32 inputs get float32 arithmetic: cuDNN would otherwise be free to run the conv in TF32
    (torch's default, and `init_runtime` turns it on), ~1e-3 relative error against the decode step's
    exact window dot product.
    """
    width = weight.shape[-1]
    if x.dtype == torch.float32 and x.is_cuda:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return F.conv1d(F.pad(x, (width - 1, 0)), weight, groups=x.shape[1])
    return F.conv1d(F.pad(x, (width - 1, 0)), weight, groups=x.shape[1])
