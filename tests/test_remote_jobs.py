"""Remote submission on a real Ray cluster: `--address http://HEAD:DASHBOARD` runs a command as a Ray job.

The module starts its own Ray head on 127.0.0.1 with a dashboard (`ray start --head --block` in its own
session, every port chosen free) and stops only that cluster at the end: its session, and any job
entrypoint still pointing at its GCS port, are killed by pid (never `ray stop`, which would stop
other people's Ray on this machine). Jobs are submitted through the installed `llava-ray` script,
three at once to keep the module short: one that succeeds (digits preparation, outputs read back from
disk), one that fails, and one detached with Ctrl-C and reattached with `llava-ray jobs logs --follow`.
The same cluster shows that a job given its address joins it (and leaves Ray's authentication settings
alone), and a job without one starts its own local Ray even when a dead cluster's address file is left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs import remote
from jobs.cli import build_parser, main
from tests.serve_fixtures import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEST_ENV = "LLAVA_RAY_REMOTE_TEST"
SECRET = "s3cr3t-for-the-job"  # forwarded with `--env TEST_ENV`: in the job's environment, never in argv


# ---- the submission helper, no cluster ----


def test_the_job_command_line_leaves_out_the_submission_flags():
    argv = [
        "-v",
        "prepare",
        "digits",
        "--out",
        "s3://b/p",
        "--address",
        "http://h:8265",
        "--pip=boto3",
        "--env",
        "A=1",
        "--working-dir",
        ".",
        "--detach",
        "--env=B=x=y",
        "--address=http://h:8265",
        "--seed",
        "3",
    ]
    submission = remote.Submission(tuple(argv), pip=("boto3",), env={"A": "1"})
    assert submission.job_argv() == ["-v", "prepare", "digits", "--out", "s3://b/p", "--seed", "3"]
    assert submission.entrypoint() == "llava-ray -v prepare digits --out s3://b/p --seed 3"
    assert submission.runtime_env() == {"env_vars": {"A": "1", remote.SUBMITTED_ENV: "1"}, "pip": ["boto3"]}
    uploaded = remote.Submission(("eval", "--config", "my eval.yaml"), working_dir=".")
    assert uploaded.entrypoint() == "python -m jobs.cli eval --config 'my eval.yaml'"
    assert uploaded.runtime_env()["working_dir"] == "." and ".git" in uploaded.runtime_env()["excludes"]


def test_the_submission_flags_parse_into_a_runtime_env():
    argv = [
        "pretrain",
        "--preset",
        "demo",
        "--address",
        "https://head:8265",
        "--env",
        "HF_HOME=/data/hf",
        "--env",
        "X=a=b",
        "--pip",
        "boto3",
        "--pip",
        "ijson>=3",
        "optim.max_steps=3",
    ]
    args = build_parser().parse_args(argv)
    submission = remote.Submission.from_args(args, argv)
    assert submission.runtime_env()["env_vars"] == {"HF_HOME": "/data/hf", "X": "a=b", remote.SUBMITTED_ENV: "1"}
    assert submission.runtime_env()["pip"] == ["boto3", "ijson>=3"]
    assert submission.entrypoint() == "llava-ray pretrain --preset demo optim.max_steps=3"
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE or NAME"):
        remote.env_pair("=value")


def test_env_name_alone_forwards_the_submitters_value_without_putting_it_in_argv(monkeypatch, capsys):
    monkeypatch.setenv("LLAVA_RAY_TEST_KEY", "sk-secret")
    argv = [
        "infer",
        "--model",
        "m",
        "--questions",
        "q",
        "--out",
        "o",
        "--address",
        "http://head:8265",
        "--env",
        "LLAVA_RAY_TEST_KEY",
        "--env",
        "PLAIN=1",
    ]
    submission = remote.Submission.from_args(build_parser().parse_args(argv), argv)
    assert submission.runtime_env()["env_vars"] == {
        "LLAVA_RAY_TEST_KEY": "sk-secret",
        "PLAIN": "1",
        remote.SUBMITTED_ENV: "1",
    }
    assert "sk-secret" not in " ".join(argv) + submission.entrypoint()
    monkeypatch.delenv("LLAVA_RAY_TEST_KEY")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "--env LLAVA_RAY_TEST_KEY: LLAVA_RAY_TEST_KEY is not set here" in capsys.readouterr().err


def test_only_a_dashboard_address_outside_a_submitted_job_submits(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(remote.SUBMITTED_ENV, raising=False)
    parse = build_parser().parse_args
    digits = ["prepare", "digits", "--out", "o"]
    assert remote.submission_target(parse(digits)) is None  # local Ray
    assert remote.submission_target(parse([*digits, "--address", "10.0.0.1:6379"])) is None  # joins as a driver
    assert remote.submission_target(parse([*digits, "--address", "http://h:8265"])) == "http://h:8265"
    assert remote.submission_target(parse(["tiny-model", "--out", "o"])) is None  # takes no --address
    assert remote.submission_target(parse(["jobs", "list", "--address", "http://h:8265"])) is None
    monkeypatch.setenv("RAY_ADDRESS", "https://h:8265")
    assert remote.submission_target(parse(digits)) == "https://h:8265"
    monkeypatch.setenv(remote.SUBMITTED_ENV, "1")  # inside the job: join the cluster Ray's RAY_ADDRESS points to
    args = parse([*digits, "--address", "http://h:8265"])
    assert remote.submission_target(args) is None and args.address is None


# ---- starting or joining Ray ----

_INIT_RAY = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
import ray
from llava.ray_runtime import init_ray
init_ray()
result = {"auth_mode": os.environ.get("RAY_AUTH_MODE"), "gcs": ray.get_runtime_context().gcs_address,
          "answer": ray.get(ray.remote(lambda: 6 * 7).remote())}
ray.shutdown()
print(json.dumps(result))
"""


def start_or_join_ray(home: Path, **env: str) -> dict:
    """Run `init_ray()` and one task in a fresh process: no RAY_ADDRESS / RAY_AUTH_MODE / auth token of ours."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    environment.update(HOME=str(home), **env)  # HOME: no ~/.ray/auth_token from this machine
    done = subprocess.run(
        [sys.executable, "-c", _INIT_RAY], capture_output=True, text=True, env=environment, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


@pytest.mark.slow  # a Ray of its own
def test_without_an_address_a_job_starts_its_own_ray_whatever_a_crashed_cluster_left(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="st", dir=os.environ["RAY_TMPDIR"]))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray").mkdir()
        # what a `ray start --head` that crashed leaves: the address of a cluster that is gone
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        started = start_or_join_ray(tmp_path, RAY_TMPDIR=str(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert started["answer"] == 42 and started["gcs"] != "127.0.0.1:1"
    assert "started a local Ray" in started["stderr"]
    assert started["auth_mode"] == "disabled"  # zero-config for the job's own local cluster only


# ---- a real cluster ----


def _session_processes(head_pid: int, gcs_port: int):
    """Processes of our cluster: its session (head, GCS, raylet, workers) and job entrypoints (own sessions)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == head_pid or proc.environ().get("RAY_ADDRESS", "").endswith(f":{gcs_port}"):
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


_GCS: dict[str, str] = {}  # dashboard URL -> GCS address of the module's cluster


@pytest.fixture(scope="module")
def cluster():
    """The dashboard URL of a fresh single-node Ray head (4 logical CPUs) on 127.0.0.1."""
    from ray.job_submission import JobSubmissionClient

    ports = []
    while len(ports) < 10:
        port = free_port()
        if port not in ports:
            ports.append(port)
    gcs, dashboard, *others = ports
    names = [
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
        "--node-manager-port",
        "--object-manager-port",
        "--ray-client-server-port",
    ]
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir=os.environ["RAY_TMPDIR"]))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # jobs find llava-ray
    log_path = temp_dir / "head.log"
    with open(log_path, "w") as log_file:
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--include-dashboard=true",
                *(f"{name}={port}" for name, port in zip(names, others)),
                "--num-cpus=4",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                "--block",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    _GCS[address] = f"127.0.0.1:{gcs}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started (after a drain)
            head.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for proc in _session_processes(head.pid, gcs):  # whatever is left of this cluster, by pid
            try:
                proc.kill()
            except Exception:
                pass
        head.wait(timeout=15)
        shutil.rmtree(temp_dir, ignore_errors=True)


def llava_ray(*args: str, extra_env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (extra_env or {})
    return subprocess.Popen(
        [str(BIN / "llava-ray"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs
    )


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=400)
    return {"code": process.returncode, "lines": [json.loads(line) for line in out.splitlines()], "stderr": err}


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """Three submissions, at once: digits preparation (succeeds), a missing JSON (fails), and the same
    failing command with --working-dir and --env, detached with Ctrl-C right after its submission."""
    out = tmp_path_factory.mktemp("remote")
    failing = ["prepare", "llava-json", "--json", "/nonexistent.json", "--images", str(out), "--address", cluster]
    ok = llava_ray("prepare", "digits", "--out", str(out / "digits"), "--address", cluster)
    bad = llava_ray(*failing, "--out", str(out / "bad"))
    detached = llava_ray(
        *failing,
        "--out",
        str(out / "bad2"),
        "--working-dir",
        str(REPO),
        "--env",
        TEST_ENV,
        extra_env={TEST_ENV: SECRET},
    )
    submitted = json.loads(detached.stdout.readline())  # printed once the job is submitted
    time.sleep(1)
    detached.send_signal(signal.SIGINT)
    result = {"out": out, "ok": finish(ok), "bad": finish(bad), "detached": finish(detached)}
    result["detached"]["lines"].insert(0, submitted)
    return result


def jobs(*args: str, capsys) -> tuple[int, dict]:
    """`llava-ray jobs ...` in this process (its result line)."""
    capsys.readouterr()
    code = main(["jobs", *args])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow  # a Ray of its own
def test_a_submitted_job_runs_on_the_cluster_and_its_result_comes_back(cluster, runs, capsys):
    ok = runs["ok"]
    assert ok["code"] == 0, ok["stderr"][-3000:]
    submitted, result = ok["lines"][0], ok["lines"][-1]
    job_id = submitted["job_id"]
    assert submitted == {"job_id": job_id, "address": cluster, "status": "SUBMITTED"}
    assert f"submitted Ray job {job_id}" in ok["stderr"]
    assert f"Running entrypoint for job {job_id}: llava-ray prepare digits --out" in ok["stderr"]  # no --address
    assert "llava.data.ingest: wrote 1497 rows" in ok["stderr"]  # the job's logs, followed on stderr
    assert remote.RESULT_PREFIX not in ok["stderr"]
    assert {name: result[name]["rows"] for name in ("stage1", "stage2", "eval")} == {
        "stage1": 1497,
        "stage2": 1497,
        "eval": 300,
    }
    for name in ("stage1", "stage2", "eval"):  # written by the cluster, read back here
        shards = [runs["out"] / "digits" / name / shard for shard in result[name]["shards"]]
        assert shards and all(shard.stat().st_size > 0 for shard in shards)
    assert jobs("status", job_id, "--address", cluster, capsys=capsys)[1]["status"] == "SUCCEEDED"


@pytest.mark.slow  # a Ray of its own
def test_a_failing_job_gives_its_exit_code_and_status(cluster, runs, capsys):
    bad = runs["bad"]
    job_id = bad["lines"][0]["job_id"]
    assert bad["code"] == 1
    final = bad["lines"][-1]
    assert final["job_id"] == job_id and final["status"] == "FAILED" and final["driver_exit_code"] == 1
    assert "/nonexistent.json: not found" in bad["stderr"]  # the job's traceback came through
    code, status = jobs("status", job_id, "--address", cluster, capsys=capsys)
    assert code == 0 and status["status"] == "FAILED" and "exit code 1" in status["message"]


@pytest.mark.slow  # a Ray of its own
def test_ctrl_c_detaches_and_jobs_logs_follow_reattaches(cluster, runs, capsys):
    from ray.job_submission import JobSubmissionClient

    detached = runs["detached"]
    job_id = detached["lines"][0]["job_id"]
    assert detached["code"] == remote.DETACHED_EXIT
    assert detached["lines"][-1] == {
        "job_id": job_id,
        "address": cluster,
        "status": detached["lines"][-1]["status"],
        "detached": True,
    }
    assert detached["lines"][-1]["status"] in ("PENDING", "RUNNING")  # left running
    assert f"llava-ray jobs logs {job_id} --follow --address {cluster}" in detached["stderr"]
    assert f"llava-ray jobs stop {job_id}" in detached["stderr"]
    reattached = finish(llava_ray("jobs", "logs", job_id, "--follow", "--address", cluster))
    assert reattached["code"] == 1  # it was not stopped: it ran to its own failure
    assert reattached["lines"][-1]["status"] == "FAILED" and reattached["lines"][-1]["job_id"] == job_id
    assert "/nonexistent.json: not found" in reattached["stderr"]
    info = JobSubmissionClient(cluster).get_job_info(job_id)  # the runtime env reached the cluster
    assert info.entrypoint.startswith("python -m jobs.cli prepare llava-json")
    assert info.runtime_env["working_dir"].startswith("gcs://")
    assert info.runtime_env["env_vars"] == {TEST_ENV: SECRET, remote.SUBMITTED_ENV: "1"}  # `--env TEST_ENV`
    assert SECRET not in info.entrypoint
    assert "working_dir_files" in reattached["stderr"]  # the traceback runs through the uploaded tree


@pytest.mark.slow  # a Ray of its own
def test_jobs_list_logs_and_stop(cluster, runs, capsys):
    ids = {name: runs[name]["lines"][0]["job_id"] for name in ("ok", "bad", "detached")}
    code, listing = jobs("list", "--address", cluster, capsys=capsys)
    statuses = {job["job_id"]: job["status"] for job in listing["jobs"]}
    assert code == 0
    assert statuses[ids["ok"]] == "SUCCEEDED" and statuses[ids["bad"]] == "FAILED"
    ours = [job for job in listing["jobs"] if job["job_id"] in ids.values()]
    assert len(ours) == 3 and all(job["metadata"]["llava_ray_command"] == "prepare" for job in ours)
    code, logs = jobs("logs", ids["ok"], "--address", cluster, capsys=capsys)
    assert code == 0 and "llava.data.ingest: wrote 300 rows" in logs["logs"]
    assert remote.RESULT_PREFIX + '{"stage1"' in logs["logs"]  # the job's emit, marked for the submitter

    capsys.readouterr()
    assert main(["prepare", "digits", "--out", str(runs["out"] / "stopped"), "--address", cluster, "--detach"]) == 0
    submitted = json.loads(capsys.readouterr().out)
    code, stopped = jobs("stop", submitted["job_id"], "--address", cluster, capsys=capsys)
    assert code == 0 and stopped["stopped"] is True
    deadline = time.monotonic() + 60
    while jobs("status", submitted["job_id"], "--address", cluster, capsys=capsys)[1]["status"] != "STOPPED":
        assert time.monotonic() < deadline, "the job did not stop"
        time.sleep(1)


@pytest.mark.slow  # a Ray of its own
def test_with_an_address_a_job_joins_the_cluster_says_so_and_leaves_ray_auth_alone(cluster, tmp_path):
    gcs = _GCS[cluster]
    joined = start_or_join_ray(tmp_path, RAY_ADDRESS=gcs)
    assert joined["answer"] == 42 and joined["gcs"].endswith(
        ":" + gcs.rpartition(":")[2]
    )  # Ray names it by the node's IP
    assert f"joining the Ray cluster at {gcs} (RAY_ADDRESS)" in joined["stderr"]
    assert joined["auth_mode"] is None  # not forced to disabled: Ray's token auth applies when the cluster uses it
