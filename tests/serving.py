"""Helpers for tests that check a served model's answers against the transformers model.

Greedy decoding in bf16 is right when every token the server picked is the transformers model's
argmax or a near-tie (top-1 logit gap <= NEAR_TIE) under teacher forcing on the server's own tokens
(docs/design.md §3, test_serve_parity.py). Exact equality between two server runs is not a
guarantee: a prompt prefilled in other chunks, or batched with other sequences, rounds differently
in bf16 and may take the other side of a near-tie, after which the texts part ways.
"""

from __future__ import annotations

import random
from pathlib import Path

from scripts.serve_parity import gaps_beyond_noise_floor, teacher_forced_gaps

NEAR_TIE = 0.1
TINY_VOCAB, TINY_SPECIAL_IDS = 384, 3  # tests/tiny_models.py: ids 0-2 are the special tokens


def token_prompt(length: int, seed: int, vocab: int = TINY_VOCAB, first_ordinary_id: int = TINY_SPECIAL_IDS) -> list[int]:
    """`length` ordinary token ids (no special tokens), the same for a seed; the tiny tokenizer's by default."""
    rng = random.Random(seed)
    return [rng.randrange(first_ordinary_id, vocab) for _ in range(length)]


def generation(choice, prompt_ids: list[int]) -> dict:
    """A completion choice requested with logprobs=1 and return_token_ids, as teacher_forced_gaps reads it."""
    return {
        "prompt": prompt_ids,
        "prompt_ids": list(prompt_ids),
        "generated_ids": list(choice.token_ids),
        "vllm_logprobs": choice.logprobs.token_logprobs,
    }


def assert_near_ties(checkpoint: Path, generations: list[dict], tolerance: float = NEAR_TIE) -> None:
    """Every served token within `tolerance` of the top-1 logit, or within its position's noise floor (4
    standard deviations of that gap under bf16-sized noise, scripts/serve_parity.py; a 30-layer model's bf16
    forward moves top-1 gaps by ~0.1-0.2 on random-token prompts, where most positions are near-ties)."""
    rows = teacher_forced_gaps(str(checkpoint), generations, reference_weights="bf16")
    beyond = gaps_beyond_noise_floor(rows, tolerance)
    compact = [(len(f["prompt"]), f["position"], f["gap"], f["noise_floor"]) for f in beyond]
    assert not beyond, f"(prompt length, position, top-1 gap, noise floor) beyond {tolerance} and the floor: {compact}"
