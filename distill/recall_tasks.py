"""In-context recall tasks (RULER-style), generated locally and deterministically from a seed.

Every task hides one or more short facts ("needles") at random depths of a neutral filler text,
then asks for one of them; the answer ends the sequence. A sample is built at the token level so
that it holds exactly `context` tokens (filler + needles + question + answer) and samples of one
length stack without padding. The answer starts at its first token that carries a character of it
(a bare leading space token, as SmolLM2 writes " 12345", stays in the prompt). Each sample also comes
with a copy in which the needle that holds the answer is replaced by the same number of filler tokens:
the log-probability of the answer with the needle minus without it is the continuous recall score (it
moves before exact match does).

    passkey   one needle: "The pass key is 12345. Remember it. 12345 is the pass key."
    multikey  `needles` keys, each for a differently named door; one is asked for (the others distract)
    assoc     associative recall: a block of `needles` "The code of <word> is <number>." facts; one is asked for
    vartrack  variable tracking: VAR A = 12345 ... VAR B = A ... (`needles` hops); the value of the last is asked for

The same (kind, context, samples, seed, needles) gives the same samples on every machine: the
random draws come from `random.Random` seeded with a string of those settings.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from distill.errors import UserError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DOOR_NAMES = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden",
              "wooden", "iron", "glass", "stone", "north", "south", "east", "west", "garden", "kitchen")
CODE_WORDS = ("apple", "river", "candle", "forest", "pencil", "mirror", "rocket", "window", "garden", "silver",
              "bottle", "castle", "dragon", "island", "jacket", "ladder", "monkey", "orange", "planet", "tiger",
              "violin", "wallet", "anchor", "basket", "cactus", "dolphin", "engine", "falcon", "guitar", "harbor")
RECALL_KINDS = ("passkey", "multikey", "assoc", "vartrack")
DEFAULT_NEEDLES = {"passkey": 1, "multikey": 4, "assoc": 8, "vartrack": 2}


@dataclass(frozen=True)
class RecallTaskSpec:
    """One recall task at one context length."""

    kind: str  # one of RECALL_KINDS
    context: int  # tokens per sample, answer included
    samples: int = 100
    seed: int = 0
    needles: int | None = None  # multikey: keys; assoc: facts in the block; vartrack: hops (None: the default)

    def __post_init__(self) -> None:
        if self.kind not in RECALL_KINDS:
            raise UserError(f"recall task {self.kind!r} is unknown; expected one of {', '.join(RECALL_KINDS)}")
        if self.samples < 1:
            raise UserError(f"recall task {self.name}: samples must be at least 1, got {self.samples}")
        if self.needles is not None and self.needles < 1:
            raise UserError(f"recall task {self.name}: needles must be at least 1, got {self.needles}")

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.context}"

    @property
    def num_needles(self) -> int:
        return 1 if self.kind == "passkey" else (self.needles or DEFAULT_NEEDLES[self.kind])


@dataclass(frozen=True)
class RecallSample:
    """Token ids of one prompt with its answer at the end, and the same prompt without the answer's needle."""

    ids: list[int]  # exactly spec.context tokens; the last answer_len are the answer
    ids_without: list[int]  # same length; the needle holding the answer replaced by filler tokens
    answer_len: int
    answer: str  # the answer text (for reports and debugging)
    depth: float = 0.0  # filler before the answer's needle / all filler: 0 at the start, 1 right before the question


@dataclass(frozen=True)
class _Facts:
    """A task instance in text: needles in order of appearance, the question, the answer."""

    needles: list[str]
    key_needle: int  # index of the needle whose removal takes the answer away
    question: str
    answer: str
    in_order: bool = False  # needles must appear in this order (a chain); otherwise shuffled
    extra: dict = field(default_factory=dict)


def _number(rng: random.Random) -> str:
    return str(rng.randint(10_000, 99_999))


def _passkey(rng: random.Random, n: int) -> _Facts:
    key = _number(rng)
    return _Facts([f" The pass key is {key}. Remember it. {key} is the pass key."], 0,
                  " What is the pass key? The pass key is", f" {key}")


def _multikey(rng: random.Random, n: int) -> _Facts:
    if n > len(DOOR_NAMES):
        raise UserError(f"multikey: at most {len(DOOR_NAMES)} keys, got {n}")
    doors = rng.sample(DOOR_NAMES, n)
    keys = [_number(rng) for _ in doors]
    asked = rng.randrange(n)
    needles = [f" The pass key for the {d} door is {k}. Remember it." for d, k in zip(doors, keys)]
    return _Facts(needles, asked, f" What is the pass key for the {doors[asked]} door? The pass key for the "
                  f"{doors[asked]} door is", f" {keys[asked]}")


def _assoc(rng: random.Random, n: int) -> _Facts:
    if n > len(CODE_WORDS):
        raise UserError(f"assoc: at most {len(CODE_WORDS)} facts, got {n}")
    words = rng.sample(CODE_WORDS, n)
    codes = [_number(rng) for _ in words]
    asked = rng.randrange(n)
    # one block: the facts sit next to each other, like a key-value list
    facts = [f" The code of {w} is {c}." for w, c in zip(words, codes)]
    head, tail = "".join(facts[:asked]), "".join(facts[asked + 1:])
    needles = [" Here is a list of codes." + head, facts[asked], tail + " That is the list."]
    return _Facts(needles, 1, f" What is the code of {words[asked]}? The code of {words[asked]} is", f" {codes[asked]}",
                  in_order=True, extra={"block": True})


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _vartrack(rng: random.Random, n: int) -> _Facts:
    names: list[str] = []
    while len(names) < n:
        name = _var_name(rng)
        if name not in names:
            names.append(name)
    value = _number(rng)
    needles = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = {a}." for a, b in zip(names, names[1:])]
    return _Facts(needles, 0, f" What is the value of VAR {names[-1]}? The value of VAR {names[-1]} is", f" {value}",
                  in_order=True)


_BUILDERS = {"passkey": _passkey, "multikey": _multikey, "assoc": _assoc, "vartrack": _vartrack}


class _Encoder:
    """Token ids without special tokens, and a filler stream long enough for any context."""

    def __init__(self, tokenizer, context: int):
        self.tokenizer = tokenizer
        unit = self(FILLER)
        if not unit:
            raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} encodes the filler text to no tokens")
        self.filler = self(FILLER * (2 + 2 * context // len(unit)))

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split_answer(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(question ids, answer ids) where the answer starts at its first token that carries a character of it.

        Tokenizers that split " 12345" into a bare space and digits (SmolLM2) would otherwise make the
        space the first answer token: exact match would then score whether the model writes a space or a
        word like " the" after "The pass key is", not whether it recalls the key.
        """
        question_ids, answer_ids = self(question), self(answer)
        while len(answer_ids) > 1 and not self.tokenizer.decode(answer_ids[:1]).strip():
            question_ids.append(answer_ids.pop(0))
        return question_ids, answer_ids


def build_recall_task(spec: RecallTaskSpec, tokenizer) -> list[RecallSample]:
    """`spec.samples` samples of exactly `spec.context` tokens each (see the module docstring)."""
    rng = random.Random(f"{spec.kind}|{spec.context}|{spec.seed}|{spec.num_needles}")
    encode = _Encoder(tokenizer, spec.context)
    out = []
    for _ in range(spec.samples):
        facts = _BUILDERS[spec.kind](rng, spec.num_needles)
        out.append(_assemble(spec, facts, encode, rng))
    return out


def _assemble(spec: RecallTaskSpec, facts: _Facts, encode: _Encoder, rng: random.Random) -> RecallSample:
    needles = [encode(n) for n in facts.needles]
    question, answer = encode.split_answer(facts.question, facts.answer)
    fixed = sum(map(len, needles)) + len(question) + len(answer)
    room = spec.context - fixed
    if room < 0:
        raise UserError(
            f"recall task {spec.name}: its needles, question and answer take {fixed} tokens, more than the context; "
            f"use a longer context or fewer needles"
        )
    if facts.extra.get("block"):  # the pieces of one block stay together at one random depth
        depth = rng.randint(0, room)
        cuts = [depth] * len(needles)
    else:
        cuts = sorted(rng.randint(0, room) for _ in needles)
    order = list(range(len(needles)))
    if not facts.in_order:
        rng.shuffle(order)
    filler = encode.filler
    spare = filler[room : room + len(needles[facts.key_needle])]  # what replaces the answer's needle
    with_needle, without = [], []
    previous = key_cut = 0
    for cut, index in zip(cuts, order):
        if index == facts.key_needle:
            key_cut = cut  # filler tokens before the answer's needle
        with_needle += filler[previous:cut] + needles[index]
        without += filler[previous:cut] + (spare if index == facts.key_needle else needles[index])
        previous = cut
    tail = filler[previous:room] + question + answer
    ids, ids_without = with_needle + tail, without + tail
    assert len(ids) == len(ids_without) == spec.context
    return RecallSample(ids, ids_without, len(answer), facts.answer.strip(), key_cut / max(room, 1))
