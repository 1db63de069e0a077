"""The scale plan on paper: per-GPU memory and hours of each stage for large teachers on 8 x H100 nodes.

    python -m bench.scale_plan            # the table in docs/scale-out.md
    python -m bench.scale_plan --check    # the calibration and its check against the second measured shape
    python -m bench.scale_plan --update-docs docs/scale-out.md   # rewrite the tables there

Every number comes from the formulas below, a teacher's published shape (bench/train_throughput.SHAPES),
the `paper` preset's budgets (distill/presets.py) and the single-GPU measurements named in MEASURED.

Memory per GPU, for one stage run with FSDP over N GPUs (N = 1: one process, what runs today):

    teacher     P_teacher x TEACHER_BYTES / (N if the teacher is sharded else 1)
    states      (P_trainable x TRAIN_BYTES + P_frozen x FROZEN_BYTES) / N
    gathered    N > 1 only: 2 layers of teacher and student in bf16 (the one running, the one prefetched),
                one student layer's fp32 gradient before its reduce-scatter, both lm_heads in bf16 (fused KL)
    activations micro x seq x layers x hidden x ACT_BYTES[stage]            (no activation checkpointing)
                micro x seq x hidden x (layers x CKPT_BYTES + ACT_BYTES[stage]) (checkpointing every layer)
    overhead    OVERHEAD_GIB (CUDA context, NCCL buffers, allocator slack)

ACT_BYTES[stage] is not derived: it is calibrated so that the formula gives the peak measured for the
Qwen2.5-1.5B shape on one GPU (bench/results/train_throughput.md) and checked on SmolLM2-135M (`--check`).

Time per micro-batch on one GPU = max(compute, communication), FSDP prefetch overlapping the two:

    compute     micro x seq x FLOPs per token / (MFU[stage] x peak bf16 FLOP/s), FLOPs as
                bench/train_throughput.stage_flops counts them (+ one student forward with checkpointing);
                MFU[stage] is the one measured for the 1.5B shape, assumed constant for larger models
    comm        (N-1)/N x bytes moved per micro-batch / bandwidth per GPU (NVLink inside a node, the NIC
                across nodes); bytes = bf16 gathers of the student (forward, and backward of what trains or
                carries gradients) and of a sharded teacher (forward), fp32 reduce-scatter of the gradients
    tokens/s    N x micro x seq / time per micro-batch;  hours = stage tokens / tokens/s / 3600

GA-S2 candidates are single-process Stage-2 runs (distill/selection.py spreads them over the processes),
so each needs the whole teacher and student on one GPU: the plan says where that fits.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from bench import train_throughput
from bench.train_throughput import layer_flops, stage_flops
from distill.model.config import HybridConfig
from distill.model.families import attention_biases, has_qk_norm
from distill.model.transfer import hybrid_config_from_teacher
from distill.placement import k_from_ratio, layer_types_for, uniform_softmax_layers
from distill.presets import get_preset
from distill.train import TrainConfig

GIB = 2**30
TRAIN_BYTES = 16  # per trained parameter: fp32 master weight 4 + fp32 gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4
FROZEN_BYTES = 4  # per frozen student parameter (Stage 1's embeddings, MLPs, norms): fp32 weight only
TEACHER_BYTES = 4  # the teacher is kept in fp32 today (cast per GEMM under bf16 autocast)
CKPT_BYTES = 4  # per token, layer and hidden unit kept under checkpointing: the layer's fp32 input
OVERHEAD_GIB = 3.0
SOFTMAX_RATIO = 0.25  # Stage 2's student keeps 1/4 of its layers softmax


@dataclass(frozen=True)
class Hardware:
    name: str = "8 x H100 80GB per node"
    gpus_per_node: int = 8
    usable_gib: float = 72.0  # of 80 GiB: what a plan may fill (fragmentation, spikes)
    peak_flops: float = 989.4e12  # dense bf16, SXM (the H200 that measured MFU has the same peak)
    intra_node_gbs: float = 300.0  # achieved all-gather / reduce-scatter bandwidth per GPU over NVLink
    inter_node_gbs: float = 40.0  # per GPU over its 400 Gb/s NIC, achieved


@dataclass(frozen=True)
class Measured:
    """One single-GPU run of bench/train_throughput.py: what the plan is calibrated or checked on."""

    shape: str
    stage: int
    micro: int
    seq: int
    tok_s: float
    peak_gib: float


# bench/results/train_throughput.md, one H200, fla-torch-dqkwg GDN path, bf16 autocast over fp32 weights, the
# 2026-12-05 eager step (Stage 1 mixer by mixer, no compile, no CUDA graph). With the 2026-12-06 defaults the
# Qwen shape's Stage 1 ran 51.5K tokens/s (2.2x) but its Stage 2 is not measured yet, so the plan stays on
# these rows, one step for both stages.
MEASURED = {
    (1, "qwen2.5-1.5b"): Measured("qwen2.5-1.5b", 1, 4, 2048, 25_335.0, 35.8),
    (2, "qwen2.5-1.5b"): Measured("qwen2.5-1.5b", 2, 4, 2048, 18_023.0, 65.7),
    (1, "smollm2-135m"): Measured("smollm2-135m", 1, 8, 2048, 56_354.0, 18.7),
    (2, "smollm2-135m"): Measured("smollm2-135m", 2, 8, 2048, 39_652.0, 25.5),
}
CALIBRATION_SHAPE = "qwen2.5-1.5b"  # the shape closest to the plan's teachers
PLAN_SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "qwen2.5-7b", "llama-3.1-8b", "llama-3.1-70b")
PLAN_NODES = (1, 2, 8)


@functools.cache
def shape_config(name: str):
    return train_throughput.shape_config(name)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    teacher: int
    student: int
    trainable: int  # of the student, in this stage
    teacher_layer: int  # the largest decoder layer
    student_layer: int
    lm_head: int  # one lm_head's parameters (counted in teacher/student unless tied)


def _attention_params(c: HybridConfig) -> int:
    qkv_bias, o_bias = attention_biases(c)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    norms = 2 * c.head_dim if has_qk_norm(c) else 0  # Qwen3's per-head q/k RMSNorm weights
    return c.hidden_size * (q + 2 * kv) + q * c.hidden_size + qkv_bias * (q + 2 * kv) + o_bias * c.hidden_size + norms


def _gdn_params(c: HybridConfig) -> int:
    """distill/model/gdn_mixer.py: q, k, v, z, a, b projections, depthwise conv over q|k|v, A_log, dt_bias,
    the per-head gated norm, o_proj; the teacher's attention biases where it has them."""
    qkv_bias, o_bias = attention_biases(c)
    heads, key = c.linear_num_value_heads, c.linear_num_key_heads * c.linear_key_head_dim
    value = heads * c.linear_value_head_dim
    conv_dim = 2 * key + value
    projections = c.hidden_size * (2 * key + 2 * value + 2 * heads) + qkv_bias * conv_dim
    return projections + conv_dim * c.linear_conv_kernel_dim + 2 * heads + c.linear_value_head_dim \
        + value * c.hidden_size + o_bias * c.hidden_size


def _dense_params(c: HybridConfig) -> tuple[int, int, int]:
    """(MLP + the two norms of one layer, embeddings + final norm, lm_head if untied)."""
    mlp = 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return mlp, c.vocab_size * c.hidden_size + c.hidden_size, head


def stage_softmax_layers(num_layers: int, stage: int) -> list[int]:
    """Stage 1's student is all linear; Stage 2's keeps SOFTMAX_RATIO of its layers softmax (which ones does
    not change a count)."""
    return [] if stage == 1 else uniform_softmax_layers(num_layers, k_from_ratio(SOFTMAX_RATIO, num_layers))


def param_counts(teacher_config, stage: int) -> ParamCounts:
    """Exact parameter counts of the teacher and of the stage's student (tests/test_scale_plan.py checks
    them against real models): Stage 1's student is all linear and trains its mixers only (the conv too
    when linear_conv_trainable); Stage 2's keeps SOFTMAX_RATIO of its layers softmax and trains everything."""
    L = teacher_config.num_hidden_layers
    softmax = stage_softmax_layers(L, stage)
    c = hybrid_config_from_teacher(teacher_config, layer_types_for(L, softmax))
    mlp, outer, head = _dense_params(c)
    attn, gdn = _attention_params(c), _gdn_params(c)
    conv = 0 if c.linear_conv_trainable else (2 * c.linear_num_key_heads * c.linear_key_head_dim
                                              + c.linear_num_value_heads * c.linear_value_head_dim) * c.linear_conv_kernel_dim
    mixers = len(softmax) * attn + (L - len(softmax)) * gdn
    student = mixers + L * mlp + outer + head
    trainable = L * (gdn - conv) if stage == 1 else student - (L - len(softmax)) * conv
    return ParamCounts(
        teacher=L * (attn + mlp) + outer + head, student=student, trainable=trainable,
        teacher_layer=attn + mlp, student_layer=max(attn, gdn) + mlp,
        lm_head=c.vocab_size * c.hidden_size,
    )


# ---------------------------------------------------------------------------------------------
# Memory and time
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    gpus: int
    micro: int
    teacher_sharded: bool = False
    checkpointing: bool = False
    shard_gpus: int = 0  # GPUs one copy of the sharded states spans: all of them (0, FSDP) or one node's (HSDP)

    @property
    def shard(self) -> int:
        return self.shard_gpus or self.gpus

    @property
    def replicas(self) -> int:
        return self.gpus // self.shard


@dataclass(frozen=True)
class Memory:
    teacher: float  # bytes
    states: float
    gathered: float
    activations: float
    overhead: float = OVERHEAD_GIB * GIB

    @property
    def total(self) -> float:
        return self.teacher + self.states + self.gathered + self.activations + self.overhead


def memory_per_gpu(config, stage: int, seq: int, s: Settings, act_bytes: float) -> Memory:
    p = param_counts(config, stage)
    h, L = config.hidden_size, config.num_hidden_layers
    frozen = p.student - p.trainable
    gathered = 0.0
    if s.shard > 1:
        gathered = 2 * 2 * (p.teacher_layer + p.student_layer) + 4 * p.student_layer + 2 * 2 * p.lm_head
    if s.checkpointing:
        activations = s.micro * seq * h * (L * CKPT_BYTES + act_bytes)
    else:
        activations = s.micro * seq * L * h * act_bytes
    return Memory(
        teacher=p.teacher * TEACHER_BYTES / (s.shard if s.teacher_sharded else 1),
        states=(p.trainable * TRAIN_BYTES + frozen * FROZEN_BYTES) / s.shard,
        gathered=gathered,
        activations=activations,
    )


def calibrate_act_bytes(stage: int, shape: str = CALIBRATION_SHAPE) -> float:
    """ACT_BYTES[stage]: the activation bytes per token, layer and hidden unit that make the formula give
    the measured single-GPU peak."""
    m = MEASURED[(stage, shape)]
    config = shape_config(shape)
    rest = memory_per_gpu(config, stage, m.seq, Settings(1, m.micro), 0.0).total
    return (m.peak_gib * GIB - rest) / (m.micro * m.seq * config.num_hidden_layers * config.hidden_size)


def flops_per_token(config, stage: int, seq: int, checkpointing: bool = False) -> float:
    """stage_flops of the stage's student; checkpointing adds one more forward of the student's trained part
    (a third of its forward + backward, which stage_flops counts as 3 x forward)."""
    L = config.num_hidden_layers
    softmax = stage_softmax_layers(L, stage)
    total = stage_flops(config, seq, softmax, stage)
    if checkpointing:
        teacher = L * layer_flops(config, True, seq) + (2 * config.hidden_size * config.vocab_size if stage == 2 else 0)
        total += (total - teacher) / 3
    return total


def measured_mfu(stage: int, shape: str = CALIBRATION_SHAPE) -> float:
    m = MEASURED[(stage, shape)]
    return m.tok_s * flops_per_token(shape_config(shape), stage, m.seq) / Hardware().peak_flops


def comm_bytes(config, stage: int, s: Settings) -> float:
    """Bytes one GPU moves per micro-batch inside its shard group (0 on one GPU): bf16 gathers, fp32 reduce-scatter."""
    if s.shard == 1:
        return 0.0
    p = param_counts(config, stage)
    backward = p.trainable if stage == 1 else p.student  # Stage 1 backpropagates through the mixers only
    moved = 2 * p.student + 2 * backward + 4 * p.trainable + (2 * p.teacher if s.teacher_sharded else 0)
    return moved * (s.shard - 1) / s.shard


def replica_bytes(config, stage: int, s: Settings) -> float:
    """HSDP: bytes one GPU moves per optimiser step across replicas (ring all-reduce of its fp32 gradient shard)."""
    if s.replicas == 1:
        return 0.0
    return 2 * 4 * param_counts(config, stage).trainable / s.shard * (s.replicas - 1) / s.replicas


@dataclass(frozen=True)
class Estimate:
    settings: Settings
    memory: Memory
    tok_s: float  # all GPUs together
    comm_bound: bool  # communication, not compute, sets the time per micro-batch
    batch: int  # sequences per optimiser step (the preset's, or raised to a multiple of gpus x micro)


def estimate(config, stage: int, cfg: TrainConfig, s: Settings, hw: Hardware = Hardware()) -> Estimate:
    mem = memory_per_gpu(config, stage, cfg.seq_len, s, calibrate_act_bytes(stage))
    compute = s.micro * cfg.seq_len * flops_per_token(config, stage, cfg.seq_len, s.checkpointing) / (
        measured_mfu(stage) * hw.peak_flops)
    per_step = s.gpus * s.micro
    accum = math.ceil(cfg.batch / per_step)
    gather_gbs = hw.intra_node_gbs if s.shard <= hw.gpus_per_node else hw.inter_node_gbs
    comm = comm_bytes(config, stage, s) / (gather_gbs * 1e9) + replica_bytes(config, stage, s) / (hw.inter_node_gbs * 1e9) / accum
    return Estimate(s, mem, per_step * cfg.seq_len / max(compute, comm), comm > compute,
                    accum * per_step)


def best_settings(config, stage: int, cfg: TrainConfig, gpus: int, hw: Hardware = Hardware()) -> Estimate | None:
    """The fastest settings that fit in hw.usable_gib, None when nothing does. Micro-batches divide the
    preset's batch over the GPUs (micro 1 with the batch raised when there are more GPUs than sequences).
    Within 2 % of the fastest: no checkpointing first, then a replicated teacher, then the larger micro-batch
    (the time model ignores per-micro-batch overheads, which favour it)."""
    micros = [m for m in (16, 8, 4, 2, 1) if cfg.batch % (m * gpus) == 0] or [1]
    groups = {gpus, min(gpus, hw.gpus_per_node)}
    fits = [
        e for m in micros for shard in groups for sharded in ((False, True) if gpus > 1 else (False,))
        for ckpt in (False, True)
        if (e := estimate(config, stage, cfg, Settings(gpus, m, sharded, ckpt, shard), hw)).memory.total
        <= hw.usable_gib * GIB
    ]
    if not fits:
        return None
    fastest = max(e.tok_s for e in fits)
    near = [e for e in fits if e.tok_s >= 0.98 * fastest]
    return min(near, key=lambda e: (e.settings.checkpointing, e.settings.teacher_sharded, -e.settings.micro,
                                    e.settings.replicas))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    shape: str
    params_b: float
    stage: str
    nodes: int
    estimate: Estimate | None
    tokens: int

    @property
    def hours(self) -> float | None:
        return None if self.estimate is None else self.tokens / self.estimate.tok_s / 3600


def stage_recipes() -> list[tuple[str, int, TrainConfig]]:
    """(label, stage, recipe) from the `paper` preset: Stage 1 100M tokens, Stage 2 600M tokens."""
    paper = get_preset("paper")
    return [("stage 1", 1, paper.stage1), ("stage 2", 2, paper.stage2.train)]


def plan(shapes=PLAN_SHAPES, nodes=PLAN_NODES, hw: Hardware = Hardware()) -> list[PlanRow]:
    rows = []
    for shape in shapes:
        config = shape_config(shape)
        params = param_counts(config, 2).teacher / 1e9
        for label, stage, cfg in stage_recipes():
            for n in nodes:
                rows.append(PlanRow(shape, params, label, n, best_settings(config, stage, cfg, n * hw.gpus_per_node, hw),
                                    cfg.tokens))
    return rows


def ga_s2_rows(shapes=PLAN_SHAPES, hw: Hardware = Hardware()) -> list[tuple[str, int, Estimate | None, int]]:
    """GA-S2: (teacher, L candidates, the best one-GPU settings of the paper preset's candidate recipe, its tokens)."""
    cand = get_preset("paper").score.candidate.train
    return [(shape, shape_config(shape).num_hidden_layers, best_settings(shape_config(shape), 2, cand, 1, hw), cand.tokens)
            for shape in shapes]


def _setting_text(e: Estimate, cfg_batch: int) -> str:
    s = e.settings
    parts = [f"micro {s.micro}", "FSDP" if s.replicas == 1 else f"HSDP {s.replicas} x {s.shard}",
             "teacher sharded" if s.teacher_sharded else "teacher replicated"]
    if s.checkpointing:
        parts.append("act. ckpt")
    if e.batch != cfg_batch:
        parts.append(f"batch {cfg_batch}->{e.batch}")
    return ", ".join(parts)


def format_plan(rows: list[PlanRow], hw: Hardware = Hardware()) -> str:
    batches = {label: cfg.batch for label, _, cfg in stage_recipes()}
    lines = [
        f"| teacher | params | stage | nodes ({hw.gpus_per_node} GPUs each) | GiB per GPU "
        "(teacher + states + gathered + activations + overhead) | settings | tokens/s | bound by | hours |",
        "|---|---:|---|---:|---|---|---:|---|---:|",
    ]
    for r in rows:
        if r.estimate is None:
            lines.append(f"| {r.shape} | {r.params_b:.1f}B | {r.stage} | {r.nodes} | does not fit {hw.usable_gib:.0f} GiB "
                         "| - | - | - | - |")
            continue
        m = r.estimate.memory
        parts = " + ".join(f"{x / GIB:.1f}" for x in (m.teacher, m.states, m.gathered, m.activations, m.overhead))
        lines.append(
            f"| {r.shape} | {r.params_b:.1f}B | {r.stage} | {r.nodes} | **{m.total / GIB:.1f}** = {parts} | "
            f"{_setting_text(r.estimate, batches[r.stage])} | {r.estimate.tok_s / 1e3:,.1f}K | "
            f"{'communication' if r.estimate.comm_bound else 'compute'} | {r.hours:.1f} |"
        )
    return "\n".join(lines)


def format_ga_s2(hw: Hardware = Hardware()) -> str:
    """Candidates go round-robin over the GPUs, so a run of G GPUs takes ceil(L / G) candidate-times."""
    cand = get_preset("paper").score.candidate.train
    lines = ["| teacher | candidates | one candidate on one GPU | GPU-hours, all candidates | hours on "
             + " / ".join(str(n) for n in PLAN_NODES) + " nodes |", "|---|---:|---|---:|---|"]
    for shape, L, e, tokens in ga_s2_rows(hw=hw):
        if e is None:
            need = memory_per_gpu(shape_config(shape), 2, cand.seq_len, Settings(1, 1, checkpointing=True),
                                  calibrate_act_bytes(2)).total / GIB
            lines.append(f"| {shape} | {L} | does not fit ({need:.0f} GiB at micro 1 with checkpointing) | - | "
                         "use kl-restore, or shard candidates over GPUs (not implemented) |")
            continue
        one = tokens / e.tok_s / 3600
        spread = " / ".join(f"{math.ceil(L / (n * hw.gpus_per_node)) * one:.2f}" for n in PLAN_NODES)
        lines.append(f"| {shape} | {L} | {e.memory.total / GIB:.1f} GiB, {_setting_text(e, cand.batch)} | "
                     f"{L * one:.1f} | {spread} |")
    return "\n".join(lines)


def format_check() -> str:
    """The calibration and how well it predicts the other measured shape."""
    lines = ["| stage | ACT_BYTES (calibrated on qwen2.5-1.5b) | MFU measured | shape | measured peak GiB | predicted GiB |",
             "|---|---:|---:|---|---:|---:|"]
    for stage in (1, 2):
        act = calibrate_act_bytes(stage)
        for shape in (CALIBRATION_SHAPE, "smollm2-135m"):
            m = MEASURED[(stage, shape)]
            pred = memory_per_gpu(shape_config(shape), stage, m.seq, Settings(1, m.micro), act).total / GIB
            lines.append(f"| {stage} | {act:.1f} | {measured_mfu(stage):.3f} | {shape} | {m.peak_gib:.1f} | {pred:.1f} |")
    return "\n".join(lines)


DOCS_BLOCK = re.compile(r"(<!-- scale_plan:(\w+) -->\n)(.*?)(<!-- /scale_plan -->)", re.S)


def generated_blocks() -> dict[str, str]:
    """The tables docs/scale-out.md holds between `<!-- scale_plan:NAME -->` and `<!-- /scale_plan -->`."""
    return {"plan": format_plan(plan()) + "\n", "ga_s2": format_ga_s2() + "\n", "check": format_check() + "\n"}


def update_docs(path: Path) -> None:
    blocks = generated_blocks()
    path.write_text(DOCS_BLOCK.sub(lambda m: m.group(1) + blocks[m.group(2)] + m.group(4), path.read_text()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="print the calibration and its check instead")
    parser.add_argument("--update-docs", type=Path, metavar="MD", help="rewrite the generated tables in MD (docs/scale-out.md)")
    args = parser.parse_args(argv)
    if args.update_docs:
        update_docs(args.update_docs)
    elif args.check:
        print(format_check())
    else:
        print(format_plan(plan()) + "\n\n" + format_ga_s2())


if __name__ == "__main__":
    main()
