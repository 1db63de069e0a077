"""torch.compile for the elementwise work of a training step, on a teacher or a hybrid.

A training step of a small model is launch-bound: the GEMMs are ~10 % of its GPU time, the rest is
casts, norms, gates and the mixer's conv/SiLU/l2norm chain, ~80 kernels per layer
(bench/results/train_throughput_profile.md). Compiled, each RMSNorm, MLP and gated norm class's
forward becomes one graph shared by every layer (torch.compile caches per code object; the weights
are inputs), and the GDN mixer's chain between its projections and the delta rule one fused kernel.
The delta rule itself stays fla's Triton (or our torch) code, called between compiled graphs.
"""

from __future__ import annotations

import functools

from torch import nn

from distill.model.families import family
from distill.model.gdn_mixer import GatedDeltaNet, GatedRMSNorm
from kernels.compiled import compiled


def set_compiled(model: nn.Module, on: bool) -> int:
    """Compile (or stop compiling) the norms, MLPs and GDN chains of a teacher or hybrid; returns how many
    modules it set. Compilation happens lazily, at a class's first call per input shape.

    A module's compiled forward is its class's compiled function bound by `functools.partial`, which a
    deep copy rebinds to the copy (`nn.Module.compile` binds the instance in a closure: a copy of such a
    module would run the original's weights)."""
    config = getattr(model, "config", None)  # a teacher or a hybrid; other models have nothing to compile here
    compiled_classes: tuple[type, ...] = (GatedRMSNorm,)
    if config is not None:
        fam = family(getattr(config, "teacher_model_type", None) or config.model_type)
        compiled_classes += (fam.norm, fam.mlp)
    changed = 0
    for module in model.modules():
        if isinstance(module, GatedDeltaNet):
            module.compiled = on
        elif isinstance(module, compiled_classes):
            if on:
                module.forward = functools.partial(compiled(type(module).forward), module)
            else:
                module.__dict__.pop("forward", None)
        else:
            continue
        changed += 1
    return changed
