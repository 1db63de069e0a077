"""`hybrid init` end to end: real files on disk, a real subprocess for the console command."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import distill  # noqa: F401
from distill.cli import main
from tests.tiny_models import make_tokenizer, save_teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama", "llama", num_layers=4)


def test_init_with_ratio_writes_loadable_hybrid(teacher_dir, tmp_path):
    out = tmp_path / "hybrid"
    assert main(["init", "--teacher", str(teacher_dir), "--ratio", "0.5", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"].count("full_attention") == 2
    assert config["provenance"]["placement"] == "uniform"
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 7)


LOAD_WITHOUT_IMPORT = """
import sys, torch, transformers
path, ids = sys.argv[1], torch.tensor([[5, 9, 2, 7]])
try:
    transformers.AutoModelForCausalLM.from_pretrained(path)
    sys.exit("loaded custom code without trust_remote_code")
except ValueError as e:
    assert "trust_remote_code=True" in str(e), e
model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
assert "distill" not in sys.modules or type(model).__module__ == "distill.model.modeling"
torch.save(model(ids).logits, sys.argv[2])
"""


def test_plain_transformers_loads_checkpoint_with_trust_remote_code(teacher_dir, tmp_path):
    """A fresh process that never imports distill: config.json's auto_map finds the architecture."""
    out = tmp_path / "hybrid"
    assert main(["init", "--teacher", str(teacher_dir), "--ratio", "0.5", "--out", str(out)]) == 0
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(out), str(tmp_path / "logits.pt")],
                            capture_output=True, text=True, timeout=300, input="n\n")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[5, 9, 2, 7]])).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_init_with_explicit_layers(teacher_dir, tmp_path):
    out = tmp_path / "hybrid"
    assert main(["init", "--teacher", str(teacher_dir), "--softmax-layers", "0,3", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["full_attention", "linear_attention", "linear_attention", "full_attention"]


@pytest.fixture
def run_cli(capsys):
    """Run `hybrid ARGS` in this process; returns (exit code, stdout, stderr)."""

    def run(*args):
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


def test_console_command_help_teaches():
    result = subprocess.run([sys.executable, "-m", "distill.cli", "init", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--softmax-layers" in result.stdout and "smollm2-135m" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--softmax-layers", "1,9"], "out of range"),
        (["--softmax-layers", "a,b"], "comma-separated"),
        (["--ratio", "1.5"], "between 0 and 1"),
    ],
)
def test_bad_layer_choice_fails_cleanly(run_cli, teacher_dir, tmp_path, args, message):
    out = tmp_path / "hybrid"
    result = run_cli("init", "--teacher", str(teacher_dir), *args, "--out", str(out))
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".hybrid.tmp-*"))


def test_missing_teacher_fails_cleanly(run_cli, tmp_path):
    result = run_cli("init", "--teacher", str(tmp_path / "nope.gguf"), "--ratio", "0.5", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "not found" in result.stderr
    result = run_cli("init", "--teacher", str(tmp_path), "--ratio", "0.5", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "config.json" in result.stderr
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_names_it(run_cli, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    make_tokenizer().save_pretrained(tmp_path / "gpt2")
    result = run_cli("init", "--teacher", str(tmp_path / "gpt2"), "--ratio", "0.5", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "'gpt2' is not supported" in result.stderr and "llama" in result.stderr
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_existing_output(run_cli, teacher_dir, tmp_path):
    out = tmp_path / "hybrid"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("init", "--teacher", str(teacher_dir), "--ratio", "0.5", "--out", str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_info_reports_bytes(run_cli, teacher_dir, tmp_path):
    out = tmp_path / "hybrid"
    run_cli("init", "--teacher", str(teacher_dir), "--ratio", "0.25", "--out", str(out))
    result = run_cli("info", str(out), "--json")
    info = json.loads(result.stdout)
    assert info["layers"] == 4 and len(info["softmax_layers"]) == 1
    assert all(row["ratio"] > 1 for row in info["cache_bytes_per_sequence"])
