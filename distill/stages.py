"""The RADLADS stages after the weight transfer (Stage 0 lives in distill.model.transfer).

Stage 1 `align`:    every attention block is a GDN mixer; each mixer learns to reproduce its teacher
                    layer's attention output from the teacher's own input to that block (teacher forcing:
                    one teacher forward, hooks capture every block's input and output; layers train
                    independently). Loss: mean over tokens of ||t - s||_2 / sqrt(d), averaged over layers.
                    Only mixer parameters train.
Stage 2 `distill`:  the teacher's attention goes back into the chosen layers; all parameters train on
                    full-vocabulary forward KL(teacher || student) at every position (fused with both
                    lm_heads: kernels.kl.fused_linear_kl). Mixers and restored attention at one LR,
                    everything else at a smaller one.
Stage 3 `finetune`: optional next-token cross-entropy.

Each stage is a loss function plus parameter groups handed to `distill.train.train`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.data import BlockOrder, CopySpans, PackedData, batch_for_step
from distill.distributed import Runtime
from distill.evaluate import EvalSet, heldout_kl, kl_from_hidden
from distill.model.compiled import set_compiled
from distill.model.config import LINEAR_ATTENTION
from distill.model.gdn_mixer import stacked_gdn_forward
from distill.model.modeling import HybridForCausalLM
from distill.train import TrainConfig, train
from kernels.compiled import compiled

# ---------------------------------------------------------------------------------------------
# Teacher forcing: capture every attention block's input and output in one teacher forward
# ---------------------------------------------------------------------------------------------


class _AllCaptured(Exception):
    """Raised by the last hook of a partial capture: the rest of the forward is not needed."""


@torch.no_grad()
def capture_attention(teacher: nn.Module, input_ids: torch.Tensor,
                      indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [L, B, T, d], outputs [L, B, T, d]): every layer's attention-block input (after its input
    norm) and that block's output, written into one tensor each as the forward passes (Stage 1 feeds them
    to its stacked mixers as they are). `indices`: only those layers, in that order (any model whose
    decoder layers hold `self_attn` there: a teacher, or a hybrid's softmax layers); the forward stops
    after the deepest of them."""
    partial = indices is not None
    indices = list(range(len(teacher.model.layers))) if indices is None else list(indices)
    layers = [teacher.model.layers[i] for i in indices]
    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    captured = 0

    def hook(index: int, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        nonlocal inputs, outputs, captured
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        y = output[0]
        if inputs is None:
            inputs, outputs = x.new_empty((len(layers), *x.shape)), y.new_empty((len(layers), *y.shape))
        inputs[index].copy_(x)
        outputs[index].copy_(y)
        captured += 1
        if partial and captured == len(layers):
            raise _AllCaptured

    handles = [layer.self_attn.register_forward_hook(functools.partial(hook, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        # a full capture runs the last layer's MLP and the final norm too: stopping early is not worth the
        # code in Stage 1, whose teacher forward may be compiled
        teacher.model(input_ids=input_ids, use_cache=False)
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def alignment_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """'l2': mean over tokens of ||t - s||_2 / sqrt(d) (the reference); 'mse': mean squared error."""
    diff = (teacher_out.float() - student_out.float())
    if kind == "l2":
        return diff.norm(dim=-1).mean() / math.sqrt(diff.shape[-1])
    if kind == "mse":
        return diff.pow(2).mean()
    raise ValueError(f"alignment loss must be 'l2' or 'mse', got {kind!r}")


def mixer_parameters(model: HybridForCausalLM) -> list[nn.Parameter]:
    """Trainable parameters of every token mixer (GDN or softmax attention)."""
    return [p for layer in model.model.layers for p in layer.mixer.parameters() if p.requires_grad]


def freeze_all_but_mixers(model: HybridForCausalLM) -> None:
    model.requires_grad_(False)
    for layer in model.model.layers:
        for name, p in layer.mixer.named_parameters():
            p.requires_grad_(name != "conv1d.weight" or model.config.linear_conv_trainable)


@torch.no_grad()
def heldout_alignment(teacher: nn.Module, student: HybridForCausalLM, eval_set: EvalSet, runtime: Runtime,
                      kind: str = "l2") -> list[float]:
    """Per-layer held-out Stage-1 alignment loss (token-weighted over all processes)."""
    mixers = [layer.linear_attn for layer in student.model.layers]
    stacked = stacks_mixers(runtime)
    sums = torch.zeros(len(mixers), dtype=torch.float64)
    count = 0
    for ids in eval_set.ids:
        with runtime.autocast():
            inputs, outputs = capture_attention(teacher, ids)
            outs = stacked_gdn_forward(mixers, inputs) if stacked else [m(x)[0] for m, x in zip(mixers, inputs)]
            losses = torch.stack([alignment_loss(out, y, kind) for out, y in zip(outs, outputs)])
        sums += losses.double().cpu() * ids.numel()  # one device sync per batch
        count += ids.numel()
    values = [runtime.all_reduce_mean(float(s)) * runtime.world for s in sums]
    count = runtime.all_reduce_mean(float(count)) * runtime.world
    return [v / max(count, 1) for v in values]


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------


def stacks_mixers(runtime: Runtime) -> bool:
    """Whether Stage 1 runs its mixers stacked, as one batched computation: the same loss with a fraction of
    the kernel launches, which is what a GPU step is bound by. "auto" stacks on CUDA only: on a CPU the
    stacked intermediates outgrow the caches and the step took twice as long (SmolLM2 shape, 8 x 512).
    FSDP shards and activation checkpointing work mixer by mixer, so runs with several processes or
    recomputation call each mixer in turn."""
    return runtime.uses("stack_mixers") and runtime.world == 1 and not runtime.parallel.activation_checkpointing


def describe_stage1_mixers(runtime: Runtime) -> str:
    """How Stage 1 runs its mixers here, and why (for the run's log)."""
    if stacks_mixers(runtime):
        return "stacked, one batched computation"
    if runtime.world > 1:
        return "one after another (FSDP shards them one by one)"
    if runtime.parallel.activation_checkpointing:
        return "one after another (activation checkpointing recomputes them one by one)"
    if runtime.parallel.stack_mixers == "off":
        return "one after another (parallel.stack_mixers=off)"
    return "one after another (faster on a CPU; parallel.stack_mixers=on stacks them)"


def stage1_loss(teacher: nn.Module, mixers: list[nn.Module], ids: torch.Tensor, stacked: bool,
                kind: str = "l2", align: Callable = alignment_loss) -> torch.Tensor:
    """Stage 1's loss on token ids: the mean over layers of each mixer's alignment loss to its teacher block,
    the mixers run stacked (one batched computation) or one after another."""
    inputs, outputs = capture_attention(teacher, ids)
    if stacked:  # one loss over [L, B, T, d] = the mean of the per-layer losses (equal sizes)
        return align(stacked_gdn_forward(mixers, inputs), outputs, kind)
    return torch.stack([align(m(x)[0], y, kind) for m, x, y in zip(mixers, inputs, outputs)]).mean()


def run_stage1(
    teacher: nn.Module,
    student: HybridForCausalLM,
    data: PackedData,
    cfg: TrainConfig,
    work_dir: Path,
    runtime: Runtime,
    eval_set: EvalSet | None = None,
    loss_kind: str = "l2",
    after_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train every GDN mixer of an all-linear `student` to reproduce its teacher layer's attention output."""
    if student.config.softmax_layers:
        raise ValueError(f"Stage 1 expects an all-linear student; layers {student.config.softmax_layers} are softmax")
    freeze_all_but_mixers(student)
    set_compiled(teacher, runtime.uses("compile"))
    align = compiled(alignment_loss) if runtime.uses("compile") else alignment_loss
    order = BlockOrder(len(data.train), cfg.seed)
    accum = cfg.grad_accum(runtime.world)

    def get_batch(step: int, micro: int) -> torch.Tensor:
        return batch_for_step(data, order, step, micro, cfg.micro_batch, accum, runtime.rank, runtime.world)

    stack = stacks_mixers(runtime)

    def loss_fn(model: HybridForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mixers = [layer.linear_attn for layer in model.model.layers]
        return stage1_loss(teacher, mixers, ids, stack, loss_kind, align), {}

    def evaluate() -> dict:
        layers = heldout_alignment(teacher, student, eval_set, runtime, loss_kind)
        return {"eval_align": sum(layers) / len(layers), "eval_align_layers": layers}

    groups = [{"params": mixer_parameters(student), "lr": cfg.lr, "name": "mixers"}]
    log = train("stage1 align", student, groups, loss_fn, get_batch, cfg, work_dir, runtime,
                evaluate if eval_set is not None else None, units=[layer.linear_attn for layer in student.model.layers],
                after_step=after_step)
    student.requires_grad_(True)
    return log


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------


def stage2_param_groups(model: HybridForCausalLM, mixer_lr: float, other_lr: float) -> list[dict]:
    """Mixers (GDN and restored attention) at mixer_lr; embeddings, MLPs, norms, lm_head at other_lr."""
    mixers, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (mixers if (".linear_attn." in name or ".self_attn." in name) else others).append(p)
    return [{"params": mixers, "lr": mixer_lr, "name": "mixers"}, {"params": others, "lr": other_lr, "name": "other"}]


@dataclass(frozen=True)
class Stage2Config:
    train: TrainConfig
    other_lr: float = 7e-6  # LR of everything that is not a token mixer (train.lr is the mixers' LR)
    # train only on documents at least this many tokens long (distill.data.DataSpec.min_doc_tokens): recall over
    # thousands of tokens needs training sequences whose dependencies span them; 0 keeps every document
    min_doc_tokens: int = 0
    copies: CopySpans = CopySpans()  # long-range copies written into each training sequence (off by default)


TeacherHiddenFn = Callable[[torch.Tensor], torch.Tensor]


def teacher_hidden_fn(teacher: nn.Module) -> TeacherHiddenFn:
    @torch.no_grad()
    def hidden(ids: torch.Tensor) -> torch.Tensor:
        return teacher.model(input_ids=ids, use_cache=False).last_hidden_state

    return hidden


def run_stage2(
    teacher: nn.Module,
    student: HybridForCausalLM,
    data: PackedData,
    cfg: Stage2Config,
    work_dir: Path,
    runtime: Runtime,
    eval_set: EvalSet | None = None,
    get_batch: Callable | None = None,
    name: str = "stage2 distill",
    after_step: Callable[[int], None] | None = None,
    first_sequence: int = 0,
) -> list[dict]:
    """All parameters train on full-vocabulary KL(teacher || student).

    get_batch(step, micro) may return (ids, teacher_hidden) pairs computed beforehand (selection
    shares one set among all its candidates); by default batches come from `data` and the teacher
    runs on each, in the data order after its first `first_sequence` sequences (which a Stage 2 this
    one continues has trained on).
    """
    tcfg = cfg.train
    student.requires_grad_(True)
    for layer in student.model.layers:
        if layer.layer_type == LINEAR_ATTENTION:
            layer.linear_attn.conv1d.weight.requires_grad_(student.config.linear_conv_trainable)
    teacher_weight = teacher.lm_head.weight.detach()
    set_compiled(teacher, runtime.uses("compile"))
    run_teacher = teacher_hidden_fn(teacher)

    if get_batch is None:
        order = BlockOrder(len(data.train), tcfg.seed, first_sequence)
        accum = tcfg.grad_accum(runtime.world)

        def get_batch(step: int, micro: int) -> torch.Tensor:
            return batch_for_step(data, order, step, micro, tcfg.micro_batch, accum, runtime.rank, runtime.world,
                                  cfg.copies)

    def loss_fn(model: HybridForCausalLM, batch) -> tuple[torch.Tensor, dict]:
        ids, h_t = batch if isinstance(batch, tuple) else (batch, run_teacher(batch))
        h_s = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return kl_from_hidden(h_s, model.lm_head.weight, h_t, teacher_weight, runtime.amp_dtype), {}

    def evaluate() -> dict:
        return {"eval_kl": heldout_kl(student, eval_set, runtime)}

    groups = stage2_param_groups(student, tcfg.lr, cfg.other_lr)
    return train(name, student, groups, loss_fn, get_batch, tcfg, work_dir, runtime,
                 evaluate if eval_set is not None else None, units=list(student.model.layers), after_step=after_step)


# ---------------------------------------------------------------------------------------------
# Stage 3
# ---------------------------------------------------------------------------------------------


def run_stage3(
    student: HybridForCausalLM,
    data: PackedData,
    cfg: TrainConfig,
    work_dir: Path,
    runtime: Runtime,
    eval_set: EvalSet | None = None,
) -> list[dict]:
    """Next-token cross-entropy on the training blocks (all parameters, one LR)."""
    student.requires_grad_(True)
    for layer in student.model.layers:
        if layer.layer_type == LINEAR_ATTENTION:
            layer.linear_attn.conv1d.weight.requires_grad_(student.config.linear_conv_trainable)
    order = BlockOrder(len(data.train), cfg.seed)
    accum = cfg.grad_accum(runtime.world)

    def get_batch(step: int, micro: int) -> torch.Tensor:
        return batch_for_step(data, order, step, micro, cfg.micro_batch, accum, runtime.rank, runtime.world)

    def loss_fn(model: HybridForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        logits = model.lm_head(h).float()
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()), {}

    def evaluate() -> dict:
        return {"eval_kl": heldout_kl(student, eval_set, runtime)}

    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": cfg.lr, "name": "all"}]
    return train("stage3 finetune", student, groups, loss_fn, get_batch, cfg, work_dir, runtime,
                 evaluate if eval_set is not None else None, units=list(student.model.layers))
