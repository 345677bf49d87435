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
        groups.append(
            {
                "name": group["groupName"],
                "max": group.get("maxReplicas", group.get("replicas", 0)),
                "min": group.get("minReplicas", 0),
                "replicas": group.get("replicas", 0),
                "gpus": limits.get("nvidia.com/gpu", 0),
                "cpus": limits.get("cpu", 0),
            }
        )
    return groups


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]
    ]


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
    assert {"aws.yaml", "kuberay/rayjob-stage1.yaml", "kuberay/rayjob-stage2.yaml", "kuberay/rayservice.yaml"} <= names
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
    spot = {
        name for name, t in gpu.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    }
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
    # llava-ray's ray.init sets this itself with --s3-endpoint; Ray refuses a job runtime env that conflicts with it.
    assert "AWS_ENDPOINT_URL" not in runtime_env.get("env_vars", {})
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
        "file there again (indented by 4 under `serveConfigV2: |`)"
    )


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
                f"+ {num_cpus} CPU(s), room for {capacity}"
            )


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


# --- security: authenticated control plane, network policies, least privilege ---------------------

NETWORK_POLICIES = KUBERAY / "networkpolicy.yaml"
SERVICE_ACCOUNTS = KUBERAY / "serviceaccount.yaml"
IAM = CLUSTER / "iam"
CONTROL_PLANE_PORTS = (6379, 8265, 10001)  # GCS, dashboard / Jobs API, Ray client
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}


def _manifests() -> dict[str, tuple[str, dict]]:
    """name -> (kind, the cluster spec) for every KubeRay resource that makes a Ray cluster."""
    out = {stage: ("RayJob", _one(path, "RayJob")) for stage, path in RAYJOBS.items()}
    out["service"] = ("RayService", _one(RAYSERVICE, "RayService"))
    return out


def _cluster_spec(kind: str, doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"]


def _all_pod_templates() -> list[tuple[str, dict, dict]]:
    """(where, pod labels as KubeRay sets them, pod spec) for every pod of every manifest, submitters included."""
    pods = []
    for name, (kind, doc) in _manifests().items():
        cluster = _cluster_spec(kind, doc)
        groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for group, spec in groups:
            labels = dict(spec["template"].get("metadata", {}).get("labels", {}))
            labels.update({"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if group == "head" else "worker"})
            pods.append((f"{name}/{group}", labels, spec["template"]["spec"]))
        if kind == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
            assert "submitterPodTemplate" in doc["spec"], (
                f"{name}: the submitter needs the Ray token (submitterPodTemplate)"
            )
            pods.append((f"{name}/submitter", {}, doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _from_secret(entry: dict | None) -> bool:
    ref = (entry or {}).get("valueFrom", {}).get("secretKeyRef", {})
    return bool(ref.get("name") and ref.get("key")) and "value" not in (entry or {})


def test_every_ray_process_uses_token_authentication_with_the_token_from_a_secret():
    """Ray 2.60 reads RAY_AUTH_MODE=token and the token from RAY_AUTH_TOKEN (docs.ray.io, "Ray token
    authentication"); the token must come from a Kubernetes Secret, never from the manifest."""
    for where, _, pod in _all_pod_templates():
        for container in pod["containers"]:
            env = _env(container)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
            assert _from_secret(env.get("RAY_AUTH_TOKEN")), f"{where}: RAY_AUTH_TOKEN must come from a secretKeyRef"


def test_no_secret_value_is_written_in_a_manifest():
    secretish = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.I)
    for where, _, pod in _all_pod_templates():
        for container in pod["containers"]:
            for name, entry in _env(container).items():
                if secretish.search(name):
                    assert _from_secret(entry), f"{where}: {name} has a literal value; use a secretKeyRef"
    for path in _yaml_files():
        assert not any(d.get("kind") == "Secret" for d in _docs(path)), (
            f"{path}: Secrets are created with kubectl, not committed"
        )


def test_the_serving_api_key_comes_from_a_secret():
    from serve.config import ServeConfig

    key_env = ServeConfig().api_key_env
    kind, doc = _manifests()["service"]
    cluster = _cluster_spec(kind, doc)
    for spec in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:  # the controller checks it at build time
        for container in spec["template"]["spec"]["containers"]:
            assert _from_secret(_env(container).get(key_env)), f"{container['name']}: {key_env} must come from a Secret"


def _selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"].get("podSelector", {})
    assert not selector.get("matchExpressions"), "keep the selectors to matchLabels (checked here)"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def _peer_allowed(peer: dict) -> bool:
    """This namespace's pods (a podSelector alone) or the KubeRay operator (its namespace + its label)."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" not in peer:
        return "podSelector" in peer
    pod_labels = peer.get("podSelector", {}).get("matchLabels", {})
    return bool(peer["namespaceSelector"].get("matchLabels")) and pod_labels == OPERATOR_LABELS


def test_network_policies_open_the_control_plane_only_to_the_namespace_and_the_operator():
    policies = [d for d in _docs(NETWORK_POLICIES) if d.get("kind") == "NetworkPolicy"]
    assert policies
    heads = [(where, labels) for where, labels, _ in _all_pod_templates() if labels.get("ray.io/node-type") == "head"]
    assert len(heads) == len(_manifests())
    for where, labels in heads:
        selecting = [p for p in policies if _selects(p, labels) and "Ingress" in p["spec"].get("policyTypes", [])]
        assert selecting, f"{where}: no NetworkPolicy selects the head pod (all ingress would be allowed)"
        for port in CONTROL_PLANE_PORTS:
            rules = [r for p in selecting for r in p["spec"].get("ingress", []) if _admits(r, port)]
            assert rules, f"{where}: port {port} is closed to everyone (the Ray pods need it)"
            for rule in rules:
                assert rule.get("from"), f"{where}: a rule admits port {port} from anywhere"
                assert all(_peer_allowed(peer) for peer in rule["from"]), f"{where}: port {port} open to {rule['from']}"
        operator = [
            r
            for p in selecting
            for r in p["spec"].get("ingress", [])
            if any("namespaceSelector" in peer for peer in r.get("from", []))
        ]
        assert all(_admits(r, port) for r in operator for port in CONTROL_PLANE_PORTS), "the operator needs these ports"


def _service_account(pod: dict) -> str | None:
    return pod.get("serviceAccountName")


def _policy(name: str) -> dict:
    import json

    return json.loads((IAM / name).read_text())


def _statements(policy: dict) -> list[dict]:
    statements = policy["Statement"]
    return statements if isinstance(statements, list) else [statements]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_training_and_serving_run_under_separate_service_accounts_and_roles():
    accounts = {
        d["metadata"]["name"]: d["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        for d in _docs(SERVICE_ACCOUNTS)
        if d.get("kind") == "ServiceAccount"
    }
    pods = {where: _service_account(pod) for where, _, pod in _all_pod_templates() if not where.endswith("/submitter")}
    train = {sa for where, sa in pods.items() if not where.startswith("service/")}
    serve = {sa for where, sa in pods.items() if where.startswith("service/")}
    assert len(train) == 1 and len(serve) == 1 and train != serve, pods
    (train_sa,), (serve_sa,) = train, serve
    assert train_sa in accounts and serve_sa in accounts
    assert accounts[train_sa] != accounts[serve_sa], "the two service accounts must map to different IAM roles"
    for who, account in (("train", train_sa), ("serve", serve_sa)):
        trust = _policy(f"{who}-trust.json")
        subjects = [
            v
            for s in _statements(trust)
            for cond in s.get("Condition", {}).values()
            for k, v in cond.items()
            if k.endswith(":sub")
        ]
        assert subjects and all(s.endswith(f":{account}") for s in subjects), f"{who}-trust.json admits {subjects}"


def _s3_arn(uri: str) -> str:
    return "arn:aws:s3:::" + uri[len("s3://") :].rstrip("/")


def test_the_serving_role_can_only_read_the_served_model():
    model = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]["model"]
    for statement in _statements(_policy("serve-policy.json")):
        assert statement["Effect"] == "Allow"
        actions = _as_list(statement["Action"])
        assert not [
            a for a in actions if any(w in a for w in ("Put", "Delete", "*", "Abort", "Restore", "Replicate"))
        ], actions
        assert set(actions) <= {"s3:GetObject", "s3:ListBucket"}, actions
        for resource in _as_list(statement["Resource"]):
            if "s3:GetObject" in actions:
                assert resource.startswith(_s3_arn(model)), f"{resource} is wider than the model {model}"
            else:  # ListBucket: only under the model's prefix
                prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
                assert all(p.startswith(model.split("/", 3)[3]) for p in _as_list(prefixes)), prefixes


def test_the_training_role_writes_only_under_the_run_prefix():
    roots = set()
    for stage in RAYJOBS:
        _, config = _check_llava_ray_command(_one(RAYJOBS[stage], "RayJob")["spec"]["entrypoint"])
        roots.add(_s3_arn(config.checkpoint.storage_path))
    writes = [
        s
        for s in _statements(_policy("train-policy.json"))
        if any(w in a for a in _as_list(s["Action"]) for w in ("Put", "Delete", "*"))
    ]
    assert writes, "training must write its checkpoints"
    for statement in _statements(_policy("train-policy.json")):
        assert "s3:*" not in _as_list(statement["Action"]) and "*" not in _as_list(statement["Resource"])
    for statement in writes:
        for resource in _as_list(statement["Resource"]):
            assert any(resource.startswith(root + "/") for root in roots), f"writes to {resource} outside {roots}"


def test_pods_run_as_non_root_without_privilege_escalation_or_capabilities():
    for where, _, pod in _all_pod_templates():
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, f"{where}: {context}"
        for container in pod["containers"]:
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, f"{where}/{container['name']}"
            assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{container['name']}"
            assert not security.get("privileged"), f"{where}/{container['name']}"
    users = re.findall(r"^USER\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image should end as a non-root user"


def test_every_image_is_pinned_by_digest():
    images = [c["image"] for _, _, pod in _all_pod_templates() for c in pod["containers"]]
    docker = _aws()["docker"]
    images += [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    images += re.findall(r"^ARG RAY_IMAGE=(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    assert len(images) > 6
    for image in images:
        assert DIGEST.search(image), f"{image} is not pinned by digest (name:tag@sha256:...)"


def test_aws_nodes_require_imdsv2():
    for name, node_type in _aws()["available_node_types"].items():
        options = node_type["node_config"].get("MetadataOptions", {})
        assert options.get("HttpTokens") == "required", f"{name}: IMDSv2 not required (MetadataOptions.HttpTokens)"


def test_aws_cluster_uses_token_authentication_and_keeps_the_dashboard_on_loopback():
    config = _aws()
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the launcher's token file"
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
