"""What `hybrid eval` measures, as typed records that round-trip through JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.atomic_io import write_json_atomic


@dataclass
class HeldoutScore:
    """Held-out text the model never trained on: KL(teacher || model) and the model's own perplexity."""

    kl: float  # mean over tokens, nats (0 for the teacher itself)
    perplexity: float  # exp(mean next-token cross-entropy)
    tokens: int  # held-out tokens scored
    seq_len: int


@dataclass
class RecallScore:
    """One recall task at one context length."""

    task: str  # "passkey", "multikey", ...
    context: int
    samples: int
    exact: float  # fraction of samples whose every answer token is the greedy (argmax) token
    logprob: float  # mean over samples of log p(answer tokens | prompt with the needle), nats
    logprob_without: float  # ... with the needle replaced by filler
    seconds: float = 0.0
    # where the misses are: samples and exact hits per quarter of the filler the answer's needle starts in
    # (first quarter: farthest from the question), and samples whose first answer token is the greedy one
    depth_samples: list[int] = field(default_factory=list)
    depth_hits: list[int] = field(default_factory=list)
    first_token_hits: int | None = None

    @property
    def exact_by_depth(self) -> list[float | None]:
        return [h / n if n else None for h, n in zip(self.depth_hits, self.depth_samples)]

    @property
    def delta(self) -> float:
        """The continuous score: how much the needle raises the answer's log-probability (nats)."""
        return self.logprob - self.logprob_without


@dataclass
class ModelReport:
    name: str
    path: str
    role: str  # "teacher" | "model" | "server"
    softmax_layers: list[int] | None = None  # None for a plain (all-softmax) model
    num_layers: int | None = None
    heldout: HeldoutScore | None = None
    recall: list[RecallScore] = field(default_factory=list)
    lm_eval: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    skipped: dict[str, str] = field(default_factory=dict)  # what was not measured, and why
    warnings: list[str] = field(default_factory=list)  # caveats about what was measured
    trained_tokens: dict[str, int] = field(default_factory=dict)  # a hybrid's tokens per stage, from its provenance

    def recall_score(self, task: str, context: int) -> RecallScore | None:
        return next((r for r in self.recall if r.task == task and r.context == context), None)


@dataclass
class EvalReport:
    date: str
    device: str
    command: str
    settings: dict
    models: list[ModelReport] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: what is here was measured, the rest was not

    def to_json(self) -> dict:
        out = asdict(self)
        for model, raw in zip(self.models, out["models"]):
            for score, raw_score in zip(model.recall, raw["recall"]):
                raw_score["delta"] = score.delta
        return out

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        raw = json.loads(Path(path).read_text())
        models = []
        for m in raw.pop("models"):
            heldout = HeldoutScore(**m.pop("heldout")) if m.get("heldout") else None
            m.pop("heldout", None)
            recall = [RecallScore(**{k: v for k, v in r.items() if k != "delta"}) for r in m.pop("recall")]
            models.append(ModelReport(heldout=heldout, recall=recall, **m))
        return cls(models=models, **raw)
