"""Tiny random teachers of every supported family, with a tokenizer trained offline, for the suite."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A language model predicts the next token from the tokens before it.",
    "Linear attention keeps a fixed-size state; softmax attention keeps every key and value.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 678 and words like hello, world, alpha, beta, gamma appear here.",
] * 20


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"attention_bias": False},
    "mistral": {"sliding_window": None},
}


def make_teacher(
    family: str = "llama",
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
):
    """A randomly initialised causal LM of `family` with GQA; weights perturbed so nothing is symmetric."""
    tokenizer = tokenizer or make_tokenizer()
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=family == "llama",
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **FAMILY_OVERRIDES[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, tokenizer


def save_teacher(path: Path, family: str = "llama", dtype: torch.dtype = torch.float32, **kw) -> Path:
    model, tokenizer = make_teacher(family, **kw)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_word_corpus(path: Path, words: str, docs: int, words_per_doc: int, seed: int = 0) -> Path:
    """A text file of `docs` documents (blank-line separated), each `words_per_doc` words drawn from `words`."""
    vocab = words.split()
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(vocab), (docs, words_per_doc), generator=gen)
    path.write_text("\n\n".join(" ".join(vocab[i] for i in row) for row in picks.tolist()))
    return path
