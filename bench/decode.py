"""Model-level decode benchmark: teacher vs hybrid, preallocated caches, CUDA graphs, one memory budget.

    hybrid bench decode --out DIR [--contexts 128,2048,8192,32768] [--budget-gib 40] [--ratio 0.25]
    python -m bench.decode ...      (the same, without the `hybrid` console script; used on the GPU)

What is measured. Both models are our `transformers` implementation (`distill.model.modeling.HybridForCausalLM`):
the teacher is the same network with every layer `full_attention` (the teacher family's own attention,
MLP and norm modules), the hybrid has the chosen fraction of softmax layers and Gated DeltaNet elsewhere.
For each context length L and each batch size B we time one decode step — every sequence emits one
token that attends to L cached tokens (softmax layers) or reads and writes its fixed state (GDN layers)
— and report tokens/s = B / step time. B is 1 and the largest batch whose cache fits the memory budget
(the same budget for both models), capped by --max-batch.

How. The caches are preallocated (`StaticDecodeCache`): a [B, kv_heads, L + margin, head_dim] K and V
buffer per softmax layer, an fp32 [B, heads, d_k, d_v] state and a conv window per GDN layer. They are
filled with random values instead of running a prefill of B x L tokens (decode cost does not depend on
the values, and a prefill of 4096 x 8K tokens per point would cost minutes of device time). One step is
captured in a CUDA graph at position L (it writes token L's K/V, attends over L + 1 keys, advances the
GDN state, feeds its argmax back as the next input) and replayed; the eager (no-graph) time is reported
too. Softmax layers run transformers' SDPA path with no mask (flash attention, native GQA). The GDN step
is `kernels.gdn_decode.gdn_decode_step` (our Triton kernel, state updated in place) by default, or the
mixer's own dispatch (fla's fused recurrent kernel) with --gdn-step model.

Weights are random with the shape of the named teacher (speed does not depend on them). Before timing,
the static-cache decode path is checked against the model's plain forward on a short random sequence.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report import command_line
from distill.errors import UserError
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION, HybridConfig
from distill.provenance import machine_description

log = logging.getLogger("bench.decode")

# The real SmolLM2-135M(-Instruct) architecture (docs/design.md §6); weights are not needed for speed.
SMOLLM2_135M = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, attention_bias=False, mlp_bias=False,
)
# A tiny Llama for smoke runs on CPU (`--teacher tiny --device cpu`).
TINY_LLAMA = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, tie_word_embeddings=True,
)
SHAPE_PRESETS = {"smollm2-135m": SMOLLM2_135M, "tiny": TINY_LLAMA}


@dataclass
class DecodeBenchConfig:
    """Settings of one `bench decode` run."""

    teacher: str = "smollm2-135m"  # a shape preset or a checkpoint directory (only its config.json is read)
    hybrid: str | None = None  # a hybrid checkpoint directory; None = the teacher's shape at `ratio`
    ratio: float = 0.25  # fraction of softmax layers for the derived hybrid (uniform placement)
    contexts: list[int] = field(default_factory=lambda: [128, 2048, 8192, 32768])
    batches: list[str] = field(default_factory=lambda: ["1", "max"])  # ints or "max" (largest that fits)
    budget_gib: float = 40.0  # KV/state cache memory per model, GiB (the same for teacher and hybrid)
    max_batch: int = 4096
    steps: int = 20  # graph replays per timing repeat
    repeats: int = 5  # timing repeats; the median is reported
    eager_steps: int = 5
    margin: int = 16  # cache slots beyond the context (eager steps advance into them)
    dtype: str = "bfloat16"
    state_dtype: str = "float32"
    gdn_step: str = "auto"  # auto | triton | model | torch
    graphs: bool = True
    device: str = "cuda"
    seed: int = 0
    profile_context: int | None = None  # also profile the kernels of one eager step at this context (max batch)


# ----------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------


def teacher_hybrid_configs(cfg: DecodeBenchConfig) -> tuple[HybridConfig, HybridConfig]:
    """(teacher as an all-softmax HybridConfig, hybrid config)."""
    from transformers import AutoConfig

    from distill.placement import k_from_ratio, layer_types_for, uniform_softmax_layers
    from distill.model.transfer import hybrid_config_from_teacher

    if cfg.teacher in SHAPE_PRESETS:
        fields = dict(SHAPE_PRESETS[cfg.teacher])
        model_type = fields.pop("model_type")
        teacher_cfg = AutoConfig.for_model(model_type, **fields)
    else:
        path = Path(cfg.teacher)
        if not (path / "config.json").is_file():
            raise UserError(f"--teacher {cfg.teacher}: not a shape preset ({', '.join(SHAPE_PRESETS)}) "
                             "nor a checkpoint directory with a config.json")
        teacher_cfg = AutoConfig.from_pretrained(path)
    if isinstance(teacher_cfg, HybridConfig):
        raise UserError("--teacher must be a softmax model, not a hybrid checkpoint")
    num_layers = teacher_cfg.num_hidden_layers
    longest = max(cfg.contexts) + cfg.margin
    teacher = hybrid_config_from_teacher(teacher_cfg, [FULL_ATTENTION] * num_layers)
    if cfg.hybrid is not None:
        hybrid = HybridConfig.from_pretrained(cfg.hybrid)
    else:
        softmax = uniform_softmax_layers(num_layers, k_from_ratio(cfg.ratio, num_layers))
        hybrid = hybrid_config_from_teacher(teacher_cfg, layer_types_for(num_layers, softmax))
    for c in (teacher, hybrid):
        c.max_position_embeddings = max(c.max_position_embeddings, longest)
        c._attn_implementation = "sdpa"
    return teacher, hybrid


def build_model(config: HybridConfig, dtype: torch.dtype, device: str, seed: int, gdn_step: str = "model"):
    """Random weights of `config`'s shape; GDN mixers decode one token with `gdn_step` (DECODE_STEPS)."""
    from distill.model.gdn_mixer import set_gdn_decode_step
    from distill.model.modeling import HybridForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = HybridForCausalLM(config)
    set_gdn_decode_step(model, DECODE_STEPS[gdn_step])
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------
# the preallocated cache
# ----------------------------------------------------------------------------------------------


class _KVLayer:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class _StateLayer:
    def __init__(self, conv: torch.Tensor, state: torch.Tensor):
        self.conv = conv
        self.recurrent_states = {0: state}  # the attribute name GatedDeltaNet reads


class StaticDecodeCache:
    """Fixed-address decode cache for a hybrid (or all-softmax) `HybridForCausalLM`.

    Implements the part of transformers' `Cache` API that our layers call: `update` (softmax layers:
    write K/V at `position`, return the keys and values up to it), `has_previous_state`,
    `update_conv_state`, `update_recurrent_state`, `layers[i].recurrent_states[0]` (GDN layers).
    Every buffer is allocated once, so a decode step can be captured in a CUDA graph. `position` is a
    Python int: the first slot the next forward writes; a captured graph keeps the position it was
    captured at.
    """

    def __init__(self, config: HybridConfig, batch: int, max_len: int, dtype: torch.dtype,
                 state_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.batch, self.max_len, self.position = batch, max_len, 0
        self.layers: list[_KVLayer | _StateLayer] = []
        conv_dim = config.cache_shape().conv_dim
        for layer_type in config.layer_types:
            if layer_type == FULL_ATTENTION:
                shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
                self.layers.append(_KVLayer(torch.empty(shape, dtype=dtype, device=device),
                                            torch.empty(shape, dtype=dtype, device=device)))
            elif layer_type == LINEAR_ATTENTION:
                state = torch.empty(batch, config.linear_num_value_heads, config.linear_key_head_dim,
                                    config.linear_value_head_dim, dtype=state_dtype, device=device)
                conv = torch.empty(batch, conv_dim, config.linear_conv_kernel_dim, dtype=dtype, device=device)
                self.layers.append(_StateLayer(conv, state))
            else:
                raise ValueError(f"unknown layer type {layer_type!r}")

    # ---- sizes -----------------------------------------------------------------------------
    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, _KVLayer):
                total += layer.keys.nbytes + layer.values.nbytes
            else:
                total += layer.conv.nbytes + layer.recurrent_states[0].nbytes
        return total

    @staticmethod
    def bytes_per_sequence(config: HybridConfig, max_len: int, dtype_bytes: int, state_dtype_bytes: int) -> int:
        """Bytes one sequence's cache takes at `max_len` slots (what `nbytes() / batch` will be): the conv
        buffer here holds the whole window, the new token's slot too."""
        return config.cache_shape().cache_bytes_per_sequence(
            max_len, dtype_bytes, state_dtype_bytes, dtype_bytes, conv_slots=config.linear_conv_kernel_dim)

    # ---- the Cache API our layers use ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        end = self.position + key_states.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"static cache is full: position {end} > max_len {self.max_len}")
        layer.keys[:, :, self.position:end].copy_(key_states)
        layer.values[:, :, self.position:end].copy_(value_states)
        return layer.keys[:, :, :end], layer.values[:, :, :end]

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.position > 0

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        layer = self.layers[layer_idx]
        width = layer.conv.shape[-1]
        if self.position == 0:
            full = F.pad(conv_states, (max(0, width - conv_states.shape[-1]), 0))
        else:
            full = torch.cat([layer.conv, conv_states], dim=-1)
        layer.conv.copy_(full[..., -width:])
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        buf = self.layers[layer_idx].recurrent_states[0]
        if recurrent_states.data_ptr() != buf.data_ptr():
            buf.copy_(recurrent_states)
        return buf

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    # ---- benchmark helpers ---------------------------------------------------------------------
    @torch.no_grad()
    def fill_random(self, context: int, seed: int = 0) -> None:
        """Stand in for a prefill of `context` tokens: random K/V, GDN state and conv window."""
        gen = torch.Generator(device=self.layers[0].conv.device if isinstance(self.layers[0], _StateLayer)
                              else self.layers[0].keys.device).manual_seed(seed)
        for layer in self.layers:
            if isinstance(layer, _KVLayer):
                layer.keys[:, :, :context].normal_(generator=gen)
                layer.values[:, :, :context].normal_(generator=gen)
            else:
                layer.conv.normal_(generator=gen)
                layer.recurrent_states[0].normal_(std=0.05, generator=gen)
        self.position = context


# ----------------------------------------------------------------------------------------------
# the GDN decode step
# ----------------------------------------------------------------------------------------------


# --gdn-step names -> the mixer's one-token path (kernels.gdn.GDN_DECODE_STEPS)
DECODE_STEPS = {"triton": "triton", "model": "auto", "torch": "torch"}


def resolve_gdn_step(name: str, device: str) -> str:
    if name != "auto":
        if name not in DECODE_STEPS:
            raise ValueError(f"--gdn-step must be auto, triton, model or torch; got {name!r}")
        return name
    if device.startswith("cuda"):
        try:
            import triton  # noqa: F401

            import kernels.gdn_decode  # noqa: F401

            return "triton"
        except ImportError:
            return "model"
    return "model"


# ----------------------------------------------------------------------------------------------
# forward through the static cache
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def forward_tokens(model, input_ids: torch.Tensor, cache: StaticDecodeCache) -> torch.Tensor:
    """Run `input_ids` [B, T] at cache.position (no mask: all sequences have the same length).

    Returns the last position's logits [B, vocab]. Does not advance cache.position.
    """
    inner = model.model
    T = input_ids.shape[1]
    position_ids = torch.arange(cache.position, cache.position + T, device=input_ids.device)[None]
    hidden = inner.forward_from_layer(inner.embed_tokens(input_ids), 0, position_ids, past_key_values=cache)
    return model.lm_head(hidden[:, -1:])[:, 0]


@torch.no_grad()
def check_static_cache(model, config: HybridConfig, dtype: torch.dtype, state_dtype: torch.dtype,
                       device: str, prompt_len: int = 24, steps: int = 4, batch: int = 2, seed: int = 0) -> dict:
    """Prefill + greedy decode through `StaticDecodeCache` vs the model's plain forward on the same tokens.

    Returns the largest |logit difference| relative to the largest |reference logit| and the
    fraction of steps whose argmax agrees.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    cache = StaticDecodeCache(config, batch, prompt_len + steps, dtype, state_dtype, device)
    logits = [forward_tokens(model, ids, cache)]
    cache.position = prompt_len
    tokens = ids
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        logits.append(forward_tokens(model, nxt, cache))
        cache.position += 1
    ref = model(input_ids=tokens, use_cache=False).logits[:, prompt_len - 1:].float()
    got = torch.stack(logits, dim=1).float()
    rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"max_rel_diff": rel, "argmax_agreement": agree, "prompt_len": prompt_len, "steps": steps}


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


@dataclass
class DecodePoint:
    model: str  # "teacher" | "hybrid"
    context: int
    batch: int
    batch_rule: str  # "1", "max" (largest in budget), or the number asked for
    cache_bytes: int
    bytes_per_sequence: int
    weight_bytes: int
    step_ms_graph: float | None
    step_ms_eager: float | None
    tokens_per_s_graph: float | None
    tokens_per_s_eager: float | None
    peak_allocated_bytes: int | None
    bytes_moved_per_step: int  # fewest bytes a step must move (weights + KV read + state read/write)
    roofline_tokens_per_s: float | None  # batch / (bytes_moved / measured copy bandwidth)
    note: str = ""


def min_bytes_per_step(config: HybridConfig, batch: int, context: int, weight_bytes: int,
                       dtype_bytes: int, state_dtype_bytes: int) -> int:
    """Weights once + every sequence's KV read (context + 1 keys) + every GDN state read and written."""
    kv = config.kv_bytes_per_token(dtype_bytes) * (context + 1)
    state = 2 * config.cache_shape().recurrent_state_bytes_per_sequence(state_dtype_bytes)
    return weight_bytes + batch * (kv + state)


def weight_bytes_read(model) -> int:
    """Parameter bytes a decode step reads (the input embedding is a gather: only B rows, counted as 0)."""
    embed = model.model.embed_tokens.weight
    total = sum(p.nbytes for p in model.parameters())
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    return total if tied else total - embed.nbytes


def measure_copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float | None:
    """Device-to-device copy bandwidth, bytes/s, counting bytes read plus bytes written."""
    if not device.startswith("cuda"):
        return None
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x, y
    return 2 * nbytes / statistics.median(times[1:])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_decode(model, config: HybridConfig, cfg: DecodeBenchConfig, context: int, batch: int,
                profile: bool = False) -> dict:
    """Time one decode step at `context` for `batch` sequences; returns step times and memory."""
    device, dtype = cfg.device, getattr(torch, cfg.dtype)
    state_dtype = getattr(torch, cfg.state_dtype)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = StaticDecodeCache(config, batch, context + cfg.margin, dtype, state_dtype, device)
    cache.fill_random(context, seed=cfg.seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)

    def step():
        logits = forward_tokens(model, input_ids, cache)
        input_ids.copy_(logits.argmax(-1, keepdim=True))

    out: dict = {"cache_bytes": cache.nbytes(), "note": ""}
    # eager: real consecutive steps, advancing the position
    step()  # warm-up (kernel selection, Triton compilation)
    _sync(device)
    eager = min(cfg.eager_steps, cfg.margin - 1)
    t0 = time.perf_counter()
    for _ in range(eager):
        step()
        cache.position += 1
    _sync(device)
    out["step_ms_eager"] = (time.perf_counter() - t0) / eager * 1e3
    cache.position = context

    out["step_ms_graph"] = None
    if cuda and cfg.graphs:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(3):
                graph.replay()
            times = []
            for _ in range(cfg.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(cfg.steps):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / cfg.steps)
            out["step_ms_graph"] = statistics.median(times)
            del graph
        except Exception as err:  # a capture failure must not lose the eager numbers
            log.warning("CUDA graph capture failed at context %d batch %d: %s", context, batch, err)
            out["note"] = f"graph capture failed: {type(err).__name__}: {str(err)[:120]}"
    out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    if profile:
        cache.position = context
        out["profile"] = profile_step(step, device)
    del cache
    return out


def profile_step(step, device: str, steps: int = 3, top: int = 15) -> dict:
    """Device time per decode step by kernel (eager steps under torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    step()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    rows = []
    for evt in prof.key_averages():
        # On CUDA count kernels only: an aten op's row repeats the device time of the kernels it launched.
        if device.startswith("cuda") and evt.key.startswith("aten::"):
            continue
        if device.startswith("cuda"):
            dev_us = getattr(evt, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(evt, "self_cuda_time_total", 0)
        else:  # CPU smoke runs: self CPU time of each op
            dev_us = evt.self_cpu_time_total
        if dev_us and dev_us > 0:
            rows.append({"kernel": evt.key[:120], "us_per_step": dev_us / steps, "calls_per_step": evt.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"device_us_per_step": sum(r["us_per_step"] for r in rows), "kernels_per_step":
            sum(r["calls_per_step"] for r in rows), "top": rows[:top]}


def largest_batch(config: HybridConfig, cfg: DecodeBenchConfig, context: int) -> int:
    per_seq = StaticDecodeCache.bytes_per_sequence(
        config, context + cfg.margin, getattr(torch, cfg.dtype).itemsize, getattr(torch, cfg.state_dtype).itemsize)
    return max(0, min(cfg.max_batch, int(cfg.budget_gib * 2**30 // per_seq)))


def run_decode_bench(cfg: DecodeBenchConfig) -> dict:
    """Measure every (model, context, batch) point; returns a JSON-able result dict."""
    device, dtype = cfg.device, getattr(torch, cfg.dtype)
    state_dtype = getattr(torch, cfg.state_dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("bench decode: --device cuda but no CUDA device is visible (pass --device cpu for a smoke run)")
    gdn_step = resolve_gdn_step(cfg.gdn_step, device)
    teacher_cfg, hybrid_cfg = teacher_hybrid_configs(cfg)
    bandwidth = measure_copy_bandwidth(device)
    result: dict = {
        "config": asdict(cfg),
        "gdn_step": gdn_step,
        "machine": machine_description(device),
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "models": {},
        "points": [],
        "checks": {},
    }
    for name, config in (("teacher", teacher_cfg), ("hybrid", hybrid_cfg)):
        model = build_model(config, dtype, device, cfg.seed, gdn_step)
        wbytes = weight_bytes_read(model)
        result["models"][name] = {
            "layers": config.num_hidden_layers,
            "softmax_layers": config.softmax_layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes_read_per_step": wbytes,
            "kv_bytes_per_token": config.kv_bytes_per_token(dtype.itemsize),
            "state_bytes_per_sequence": config.state_bytes_per_sequence(state_dtype.itemsize, dtype.itemsize),
        }
        try:  # in float32: it checks the cache glue (and the GDN step kernel), not bf16 rounding
            check_model = build_model(config, torch.float32, device, cfg.seed, gdn_step)
            result["checks"][name] = check_static_cache(
                check_model, config, torch.float32, torch.float32, device, seed=cfg.seed)
            del check_model
        except Exception as err:  # report it, still time the decode step
            log.exception("%s static-cache check failed", name)
            result["checks"][name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        log.info("%s static-cache check: %s", name, result["checks"][name])
        for context in cfg.contexts:
            for rule in cfg.batches:
                batch = largest_batch(config, cfg, context) if rule == "max" else int(rule)
                if batch < 1:
                    log.warning("%s: no sequence of %d tokens fits %.1f GiB", name, context, cfg.budget_gib)
                    continue
                per_seq = StaticDecodeCache.bytes_per_sequence(
                    config, context + cfg.margin, dtype.itemsize, state_dtype.itemsize)
                moved = min_bytes_per_step(config, batch, context, wbytes, dtype.itemsize, state_dtype.itemsize)
                try:
                    timing = time_decode(model, config, cfg, context, batch,
                                         profile=(rule == "max" and context == cfg.profile_context))
                except torch.OutOfMemoryError as err:
                    log.warning("%s context %d batch %d: out of memory (%s)", name, context, batch, err)
                    torch.cuda.empty_cache()
                    continue
                graph_ms, eager_ms = timing["step_ms_graph"], timing["step_ms_eager"]
                point = DecodePoint(
                    model=name, context=context, batch=batch, batch_rule=rule,
                    cache_bytes=timing["cache_bytes"], bytes_per_sequence=per_seq, weight_bytes=wbytes,
                    step_ms_graph=graph_ms, step_ms_eager=eager_ms,
                    tokens_per_s_graph=batch / graph_ms * 1e3 if graph_ms else None,
                    tokens_per_s_eager=batch / eager_ms * 1e3 if eager_ms else None,
                    peak_allocated_bytes=timing["peak_allocated_bytes"],
                    bytes_moved_per_step=moved,
                    roofline_tokens_per_s=batch / (moved / bandwidth) if bandwidth else None,
                    note=timing["note"],
                )
                result["points"].append(asdict(point))
                if "profile" in timing:
                    result.setdefault("profiles", {})[f"{name}@{context}"] = timing["profile"]
                best = point.tokens_per_s_graph or point.tokens_per_s_eager
                log.info("%-7s ctx %6d batch %5d: %10.0f tok/s  (graph %s ms, eager %.2f ms, cache %.2f GiB)",
                         name, context, batch, best, f"{graph_ms:.3f}" if graph_ms else "-", eager_ms,
                         point.cache_bytes / 2**30)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="smollm2-135m",
                   help="shape preset (smollm2-135m, tiny) or a teacher checkpoint dir (its config only)")
    p.add_argument("--hybrid", default=None, help="hybrid checkpoint dir (config only); default: teacher at --ratio")
    p.add_argument("--ratio", type=float, default=0.25, help="softmax fraction of the derived hybrid (default 0.25)")
    p.add_argument("--contexts", default="128,2048,8192,32768", help="comma-separated context lengths")
    p.add_argument("--batches", default="1,max", help="comma-separated batch sizes or 'max' (largest in budget)")
    p.add_argument("--budget-gib", type=float, default=40.0, help="cache memory budget per model, GiB (default 40)")
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="graph replays per timing repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gdn-step", default="auto", choices=["auto", "triton", "model", "torch"],
                   help="GDN decode kernel: triton = kernels.gdn_decode (in place), model = the mixer's dispatch (fla)")
    p.add_argument("--no-graphs", action="store_true", help="eager timing only")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-context", type=int, default=None,
                   help="also profile one eager step's kernels at this context (largest batch)")
    p.add_argument("--note", default=None, help="free text stored with the result (how/where it was run)")
    p.add_argument("--out", type=Path, required=True, help="directory for decode.json, report and plots")


def config_from_args(args: argparse.Namespace) -> DecodeBenchConfig:
    return DecodeBenchConfig(
        teacher=args.teacher, hybrid=args.hybrid, ratio=args.ratio,
        contexts=[int(c) for c in args.contexts.split(",") if c],
        batches=[b.strip() for b in args.batches.split(",") if b.strip()],
        budget_gib=args.budget_gib, max_batch=args.max_batch, steps=args.steps, repeats=args.repeats,
        dtype=args.dtype, gdn_step=args.gdn_step, graphs=not args.no_graphs, device=args.device, seed=args.seed,
        profile_context=args.profile_context,
    )


def run_cli(args: argparse.Namespace) -> None:
    from bench.report import render_decode_report

    cfg = config_from_args(args)
    for b in cfg.batches:
        if b != "max" and not b.isdigit():
            raise UserError(f"--batches entries must be integers or 'max', got {b!r}")
    result = run_decode_bench(cfg)
    if getattr(args, "note", None):
        result["note"] = args.note
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(result, indent=2))
    report = render_decode_report(result, args.out)
    print(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_cli(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
