"""The cluster configs in cluster/ (AWS launcher, KubeRay RayJobs and RayService) are valid and runnable.

Fast and offline, no Ray cluster: every YAML parses; the AWS launcher file has a CPU head, an
on-demand and a spot GPU group and passes Ray's own config validation; every RayJob entrypoint is
split like a shell would, parsed by `llava-ray`'s real parser, and its --config file and overrides
are loaded by the training config loader (a wrong key fails here, not hours into a cluster run); the
RayService embeds serve/config.yaml unchanged and its import path resolves. The commands shown in
cluster/README.md go through the same checks.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import COMMANDS, build_parser
from llava.training.config import load_train_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
AWS = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = {"stage1": KUBERAY / "rayjob-stage1.yaml", "stage2": KUBERAY / "rayjob-stage2.yaml"}
RAYSERVICE = KUBERAY / "rayservice.yaml"
SERVE_CONFIG = REPO / "serve" / "config.yaml"

# Jobs whose --config/--preset/overrides go through load_train_config (jobs/train_job.py: run_train).
TRAIN_JOBS = {"pretrain", "finetune"}
GPU_INSTANCE = re.compile(r"^(p\d|g\d)")  # EC2 GPU families: p3/p4d/p5, g4dn/g5/g6/g6e ...


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if isinstance(d, dict) and d.get("kind") == kind]
    assert len(found) == 1, f"{path.relative_to(REPO)}: expected one {kind}, found {len(found)}"
    return found[0]


def _quantity(value) -> float:
    """A Kubernetes CPU / GPU quantity ("8", 4, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _worker_pods(cluster_spec: dict) -> list[dict]:
    """Per worker group: max pods and what one pod has (GPUs, CPUs), from the container limits."""
    groups = []
    for group in cluster_spec["workerGroupSpecs"]:
        limits = {}
        for container in group["template"]["spec"]["containers"]:
            for key, value in container.get("resources", {}).get("limits", {}).items():
                limits[key] = limits.get(key, 0) + (_quantity(value) if key in ("cpu", "nvidia.com/gpu") else 0)
        groups.append({"name": group["groupName"], "max": group.get("maxReplicas", group.get("replicas", 0)),
                       "min": group.get("minReplicas", 0), "replicas": group.get("replicas", 0),
                       "gpus": limits.get("nvidia.com/gpu", 0), "cpus": limits.get("cpu", 0)})
    return groups


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def _check_llava_ray_command(command: str):
    """Split like a shell, parse with llava-ray's parser, load a training job's config. Returns (args, config)."""
    argv = shlex.split(command)
    assert argv and argv[0] == "llava-ray", f"not a llava-ray command: {command!r}"
    assert len(argv) > 1 and argv[1] in COMMANDS, f"unknown llava-ray subcommand in {command!r}"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on an unknown flag or a missing argument
        raise AssertionError(f"llava-ray's parser rejects {argv[1:]}") from exc
    config = None
    if getattr(args, "config", None):
        assert (REPO / args.config).is_file(), f"--config {args.config} does not exist in the repo"
    if args.command in TRAIN_JOBS:
        path = str(REPO / args.config) if args.config else None
        config = load_train_config(args.command, preset=args.preset, path=path, overrides=args.overrides)
    return args, config


# --- every file -------------------------------------------------------------------------------


def test_the_cluster_files_are_there():
    names = {str(p.relative_to(CLUSTER)) for p in _yaml_files()}
    assert {"aws.yaml", "kuberay/rayjob-stage1.yaml", "kuberay/rayjob-stage2.yaml",
            "kuberay/rayservice.yaml"} <= names
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


def test_ray_versions_agree_everywhere():
    """The launcher images, the Dockerfile's base image and every rayVersion name one Ray release."""
    versions = set()
    for path in [*_yaml_files(), CLUSTER / "Dockerfile"]:
        text = path.read_text()
        versions |= set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
        versions |= set(re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text))
    assert len(versions) == 1, f"several Ray versions named in cluster/: {sorted(versions)}"


# --- AWS cluster launcher ---------------------------------------------------------------------


def _aws() -> dict:
    return yaml.safe_load(AWS.read_text())


def test_aws_launcher_has_a_cpu_head_and_on_demand_and_spot_gpu_groups():
    config = _aws()
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["auth"]["ssh_user"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "the head should be a CPU instance"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if GPU_INSTANCE.match(t["node_config"]["InstanceType"])}
    spot = {name for name, t in gpu.items()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    on_demand = set(gpu) - spot
    assert spot, "no spot GPU worker group (InstanceMarketOptions.MarketType: spot)"
    assert on_demand, "no on-demand GPU worker group"
    for name, node_type in workers.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers")
        assert high is not None and 0 <= low <= high, f"{name}: need 0 <= min_workers <= max_workers"
        assert high <= config["max_workers"], f"{name}: max_workers above the cluster's max_workers"
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]


def test_aws_nodes_reach_s3_through_an_instance_profile():
    for name, node_type in _aws()["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"{name}: no IamInstanceProfile"


def test_aws_setup_installs_this_package():
    config = _aws()
    commands = config.get("setup_commands", []) + config.get("worker_setup_commands", [])
    assert any("pip install" in c and "llava-ray" in c for c in commands), commands
    assert config["docker"]["image"] or config.get("setup_commands")


def test_aws_launcher_passes_rays_config_validation():
    """Ray's own schema and checks, after filling in the AWS defaults (what `ray up` does first)."""
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(copy.deepcopy(_aws()))
    util.validate_config(config)


# --- KubeRay RayJobs --------------------------------------------------------------------------


@pytest.mark.parametrize("stage", sorted(RAYJOBS))
def test_rayjob_manifest(stage):
    job = _one(RAYJOBS[stage], "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert isinstance(runtime_env, dict)
    # llava-ray's ray.init sets this itself; Ray refuses a job runtime env that conflicts with it.
    assert "worker_process_setup_hook" not in runtime_env
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert any(g["gpus"] > 0 for g in _worker_pods(cluster)), "no GPU worker group"
    for pod in _pod_specs(cluster):
        assert pod.get("serviceAccountName"), "every pod needs the service account that grants S3 access"
        assert all(c.get("image") for c in pod["containers"])


@pytest.mark.parametrize("stage", sorted(RAYJOBS))
def test_rayjob_entrypoint_parses_and_its_config_loads(stage):
    entrypoint = _one(RAYJOBS[stage], "RayJob")["spec"]["entrypoint"]
    args, config = _check_llava_ray_command(entrypoint)
    assert args.command == {"stage1": "pretrain", "stage2": "finetune"}[stage]
    assert args.config, "the entrypoint should name its config file"
    assert config.data.train and all(uri.startswith("s3://") for uri in config.data.train), config.data.train
    assert config.checkpoint.storage_path.startswith("s3://"), "runs must go to storage every node shares"
    assert config.workers.use_gpu is True, "an autoscaled cluster has no GPUs yet when the job starts"


def test_a_wrong_override_key_in_an_entrypoint_fails():
    entrypoint = _one(RAYJOBS["stage1"], "RayJob")["spec"]["entrypoint"]
    with pytest.raises(Exception, match="storge_path"):
        _check_llava_ray_command(entrypoint + " checkpoint.storge_path=s3://my-bucket/x")
    with pytest.raises(AssertionError, match="does not exist"):
        _check_llava_ray_command(entrypoint.replace("v1_5/pretrain.yaml", "v1_5/nope.yaml"))


@pytest.mark.parametrize("stage", sorted(RAYJOBS))
def test_rayjob_cluster_can_hold_the_training_workers(stage):
    job = _one(RAYJOBS[stage], "RayJob")
    _, config = _check_llava_ray_command(job["spec"]["entrypoint"])
    groups = _worker_pods(job["spec"]["rayClusterSpec"])
    gpus = sum(g["max"] * g["gpus"] for g in groups)
    cpus = sum(g["max"] * g["cpus"] for g in groups)
    workers = config.workers
    assert workers.num_workers * workers.gpus_per_worker <= gpus, f"{workers.num_workers} GPU workers, {gpus} GPUs"
    assert workers.num_workers * workers.cpus_per_worker < cpus, "no CPU left for Ray Data"
    for g in groups:
        assert 0 <= g["min"] <= g["replicas"] <= g["max"], g


def test_stage2_starts_from_the_stage1_run():
    _, stage1 = _check_llava_ray_command(_one(RAYJOBS["stage1"], "RayJob")["spec"]["entrypoint"])
    _, stage2 = _check_llava_ray_command(_one(RAYJOBS["stage2"], "RayJob")["spec"]["entrypoint"])
    stage1_run = stage1.checkpoint.storage_path.rstrip("/") + "/" + stage1.checkpoint.run_name
    assert stage2.init_from == stage1_run
    assert stage2.checkpoint.run_name != stage1.checkpoint.run_name


# --- KubeRay RayService -----------------------------------------------------------------------


def test_rayservice_embeds_serve_config_unchanged():
    service = _one(RAYSERVICE, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(SERVE_CONFIG.read_text()), (
        "cluster/kuberay/rayservice.yaml's serveConfigV2 differs from serve/config.yaml: paste the "
        "file there again (indented by 4 under `serveConfigV2: |`)")


def test_rayservice_cluster_has_gpu_workers_for_every_replica():
    service = _one(RAYSERVICE, "RayService")
    cluster = service["spec"]["rayClusterConfig"]  # RayService's name for the cluster spec
    for pod in _pod_specs(cluster):
        assert pod.get("serviceAccountName"), "the replicas load the model from S3"
    groups = [g for g in _worker_pods(cluster) if g["gpus"] > 0]
    assert groups, "no GPU worker group"
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        args = app.get("args", {})
        replica, autoscaling = args.get("replica", {}), args.get("autoscaling", {})
        num_gpus, num_cpus = replica.get("num_gpus", 0), replica.get("num_cpus", 1)
        if num_gpus > 0:
            capacity = sum(g["max"] * int(g["gpus"] // num_gpus) for g in groups if g["cpus"] >= num_cpus)
            assert autoscaling.get("max_replicas", 1) <= capacity, (
                f"{app['name']}: {autoscaling.get('max_replicas')} replicas of {num_gpus} GPU(s) "
                f"+ {num_cpus} CPU(s), room for {capacity}")


def test_serve_import_path_resolves(monkeypatch):
    if not (REPO / "serve" / "app.py").exists():
        pytest.skip("serve/app.py does not exist yet (the serving app is being written in serve/)")
    monkeypatch.syspath_prepend(str(REPO))
    for app in yaml.safe_load(SERVE_CONFIG.read_text())["applications"]:
        module, _, attr = app["import_path"].partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{app['import_path']}: module {module} not found"
        # The attribute is defined at the module's top level (checked without importing Ray Serve).
        tree = ast.parse(Path(spec.origin).read_text())
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert attr in names, f"{app['import_path']}: {module} defines no {attr}"


# --- the commands in cluster/README.md --------------------------------------------------------


def _readme_llava_ray_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" && ")[0]
            if " -- llava-ray " in line:
                commands.append("llava-ray " + line.split(" -- llava-ray ", 1)[1])
            elif line.strip().startswith("llava-ray "):
                commands.append(line.strip())
    return commands


def test_readme_commands_parse_and_load():
    commands = _readme_llava_ray_commands()
    assert any(shlex.split(c)[1] == "prepare" for c in commands)
    assert {shlex.split(c)[1] for c in commands} >= TRAIN_JOBS
    for command in commands:
        _check_llava_ray_command(command)
