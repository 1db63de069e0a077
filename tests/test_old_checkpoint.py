"""A checkpoint written before the architecture moved to `distill.model` still loads.

tests/data/checkpoint_8a297e0 holds what `hybrid init` wrote at commit 8a297e0 for a tiny Qwen2
teacher: its config.json, its remote-code shim (which imports `distill.config` and `distill.modeling`)
and that code's logits. The weights are not stored: today's `hybrid init` writes them from the same
teacher and seed, bit for bit what 8a297e0 wrote (which this test checks through the logits).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import distill  # noqa: F401
from distill.cli import main
from tests.tiny_models import save_teacher

OLD = Path(__file__).parent / "data" / "checkpoint_8a297e0"
EXPECTED = json.loads((OLD / "expected.json").read_text())

LOAD_WITH_OLD_SHIM = """
import json, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__module__ == "distill.model.modeling", type(model).__module__
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits[0]
print(json.dumps(logits[:, :8].tolist()))
"""


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("old")
    teacher = save_teacher(root / "teacher", "qwen2", num_layers=4)
    out = root / "hybrid"
    assert main(["init", "--teacher", str(teacher), "--softmax-layers", "1,3", "--out", str(out)]) == 0
    for name in ("config.json", "hybrid_gdn.py"):
        shutil.copy(OLD / name, out / name)
    assert "from distill.config import HybridConfig" in (out / "hybrid_gdn.py").read_text()
    return out


def test_old_checkpoint_loads_and_computes_the_old_logits(old_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(old_checkpoint)
    with torch.no_grad():
        logits = model(torch.tensor(EXPECTED["input_ids"])).logits[0]
    torch.testing.assert_close(logits[:, :8], torch.tensor(EXPECTED["first_logits"]), rtol=0, atol=2e-6)
    assert logits.argmax(-1).tolist() == EXPECTED["argmax"]


def test_old_shim_loads_through_remote_code(old_checkpoint):
    """A fresh process that never imports distill itself: the old shim's imports still resolve."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_OLD_SHIM, str(old_checkpoint), json.dumps(EXPECTED["input_ids"])],
        capture_output=True, text=True, timeout=300, input="n\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(EXPECTED["first_logits"]), rtol=0, atol=2e-6)
