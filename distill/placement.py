"""Which layers keep softmax attention: counts, uniform placement, parsing user lists."""

from __future__ import annotations

import math

from distill.errors import UserError
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION


def k_from_ratio(ratio: float, num_layers: int) -> int:
    """K = round-half-up(ratio * L), at least 0 and at most L."""
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"--ratio must be between 0 and 1 (the fraction of layers kept softmax), got {ratio}")
    return min(num_layers, int(math.floor(ratio * num_layers + 0.5)))


def uniform_softmax_layers(num_layers: int, k: int) -> list[int]:
    """K evenly spaced layers, each at the centre of its 1/K-th of the network."""
    return sorted({int((j + 0.5) * num_layers / k) for j in range(k)}) if k else []


def parse_layer_list(text: str, num_layers: int) -> list[int]:
    """"3,7,11" -> [3, 7, 11], checked against the teacher's layer count."""
    try:
        layers = sorted({int(part) for part in text.replace(" ", "").split(",") if part != ""})
    except ValueError:
        raise UserError(f"--softmax-layers must be comma-separated layer indices like 3,7,11; got {text!r}") from None
    out_of_range = [i for i in layers if not 0 <= i < num_layers]
    if out_of_range:
        raise UserError(
            f"--softmax-layers {out_of_range} out of range: the teacher has {num_layers} layers (valid 0..{num_layers - 1})"
        )
    return layers


def layer_types_for(num_layers: int, softmax_layers: list[int]) -> list[str]:
    keep = set(softmax_layers)
    return [FULL_ATTENTION if i in keep else LINEAR_ATTENTION for i in range(num_layers)]
