"""The run manifest of `llava-ray pipeline`: what each stage consumed, produced and measured, in `<root>/pipeline.json`.

    manifest = RunManifest.load("s3://bucket/runs/exp1")
    record = manifest.run_stage("stage1", config={...}, inputs={...}, upstream={"prepare": prep},
                                work=lambda: (outputs, metrics))

A stage is identified by its fingerprint: a hash of its resolved config, its inputs (the upstream outputs it
reads) and its upstream stages' fingerprints, so any change propagates downstream. Only fields that can change
a stage's results enter it: the `operational` ones a stage names (how many workers, how often to log or
checkpoint, how many checkpoints to keep, ...) are recorded but not fingerprinted, so changing them resumes or
skips a stage instead of re-running it. `run_stage` skips a stage whose record is complete with the same
fingerprint and whose outputs still exist, and runs it otherwise: never run, config or inputs changed,
interrupted (status still `running`: training stages resume from their newest checkpoint), failed, or outputs
gone. When the fingerprint changed, the previous outputs under the root are moved aside, versioned
(`<output>.v1`, `.v2`, ...: never deleted) and listed in the record's `superseded`. The manifest is rewritten
(atomically for local roots) when a stage starts, ends or fails, so an interrupted run shows it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from llava import storage

log = logging.getLogger(__name__)

MANIFEST_FILE = "pipeline.json"
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def result_fields(config: dict, operational: Iterable[str] = ()) -> dict:
    """`config` without the `operational` fields (dotted paths, e.g. "workers" or "checkpoint.keep")."""
    out = copy.deepcopy(config)
    for path in operational:
        *parents, last = path.split(".")
        target = out
        for part in parents:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target.pop(last, None)
    return out


def fingerprint(config: Any, inputs: Any = None, upstream: dict[str, str] | None = None) -> str:
    """sha256 of the canonical JSON of (config, inputs, {upstream stage: its fingerprint})."""
    text = json.dumps({"config": config, "inputs": inputs, "upstream": upstream or {}}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> dict:
    """{"package": llava-ray's version, "git_commit": HEAD of the source checkout if it is one, "git_dirty"}."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("llava-ray")
    except PackageNotFoundError:
        package = None
    out: dict = {"package": package, "git_commit": None}
    source = Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(source)]
        out["git_commit"] = (
            subprocess.run(
                [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        out["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package, or no git
    return out


@dataclass
class StageRecord:
    status: str  # running | complete | failed
    fingerprint: str
    config: dict  # the stage's resolved config
    inputs: dict = field(default_factory=dict)  # upstream outputs it read
    upstream: dict = field(default_factory=dict)  # upstream stage -> its fingerprint
    code: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)  # URIs it wrote
    metrics: dict = field(default_factory=dict)
    started: Optional[str] = None
    ended: Optional[str] = None
    error: Optional[str] = None
    superseded: list = field(default_factory=list)  # earlier runs with other results: {fingerprint, ended, moved}
    ran: bool = field(default=False, compare=False)  # this invocation ran it (not stored)
    reason: str = field(default="", compare=False)  # why it ran or was skipped (not stored)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("ran", "reason")}


def _uris(outputs: Any) -> list[str]:
    """Every URI-like string leaf of an outputs dict."""
    if isinstance(outputs, dict):
        return [u for v in outputs.values() for u in _uris(v)]
    if isinstance(outputs, list):
        return [u for v in outputs for u in _uris(v)]
    return [outputs] if isinstance(outputs, str) and (outputs.startswith(("/", "s3://"))) else []


class RunManifest:
    """`<root>/pipeline.json`: {"root", "updated", "code", "stages": {name: StageRecord fields}}."""

    def __init__(self, root: str, stages: dict[str, StageRecord] | None = None):
        self.root, self.uri = root, storage.join(root, MANIFEST_FILE)
        self.stages: dict[str, StageRecord] = stages or {}

    @classmethod
    def load(cls, root: str) -> RunManifest:
        uri = storage.join(root, MANIFEST_FILE)
        if not storage.exists(uri):
            return cls(root)
        data = json.loads(storage.read_text(uri))
        return cls(root, {name: StageRecord(**rec) for name, rec in data.get("stages", {}).items()})

    def save(self) -> None:
        data = {
            "root": self.root,
            "updated": now(),
            "code": code_version(),
            "stages": {name: rec.to_json() for name, rec in self.stages.items()},
        }
        storage.write_text(self.uri, json.dumps(data, indent=2))

    def decide(self, name: str, fp: str) -> tuple[bool, str]:
        """(run it?, why)."""
        rec = self.stages.get(name)
        if rec is None:
            return True, "no record in the manifest"
        if rec.fingerprint != fp:
            return True, f"config or inputs changed (fingerprint {rec.fingerprint[:12]} -> {fp[:12]})"
        if rec.status == RUNNING or rec.ended is None:
            return True, f"interrupted (started {rec.started}, never ended): resuming"
        if rec.status != COMPLETE:
            return True, f"{rec.status} last time ({rec.error}): running it again"
        missing = [u for u in _uris(rec.outputs) if not storage.exists(u)]
        if missing:
            return True, f"outputs missing: {missing[:3]}"
        return False, f"complete since {rec.ended}, same config and inputs"

    def move_aside(self, uris: Iterable[str]) -> dict[str, str]:
        """Rename each existing URI under the root to `<uri>.v<N>` (the first free N from 1); returns {from: to}.
        URIs outside the root are the user's and left alone; one inside another moves with it."""
        prefix = self.root.rstrip("/") + "/"
        inside = sorted({u.rstrip("/") for u in uris if u.startswith(prefix)})
        tops = [u for u in inside if not any(u.startswith(o + "/") for o in inside if o != u)]
        moved = {}
        for uri in tops:
            if not storage.exists(uri):
                continue
            n = 1
            while storage.exists(f"{uri}.v{n}"):
                n += 1
            storage.move(uri, f"{uri}.v{n}")
            moved[uri] = f"{uri}.v{n}"
        return moved

    def run_stage(
        self,
        name: str,
        config: dict,
        work: Callable[[], tuple[dict, dict]],
        inputs: dict | None = None,
        upstream: dict[str, StageRecord] | None = None,
        reset: Callable[[StageRecord], list[str]] | None = None,
        operational: Iterable[str] = (),
    ) -> StageRecord:
        """Run `work() -> (outputs, metrics)` unless the manifest says this exact stage is complete.

        `upstream` (name -> record) feeds the fingerprint, `operational` (dotted config paths) stays out of it.
        When the fingerprint changed, the previous run's outputs are moved aside (:meth:`move_aside`): the URIs
        `reset(old_record)` returns (e.g. a training run dir, which would otherwise be resumed), else its outputs.
        """
        upstream_fps = {n: r.fingerprint for n, r in (upstream or {}).items()}
        inputs = inputs or {}
        fp = fingerprint(result_fields(config, operational), inputs, upstream_fps)
        run, why = self.decide(name, fp)
        old = self.stages.get(name)
        if not run:
            log.info("stage %s: skipped, %s; outputs %s", name, why, json.dumps(old.outputs))
            old.ran, old.reason = False, why
            return old
        log.info("stage %s: running, %s", name, why)
        superseded = list(old.superseded) if old is not None else []
        if old is not None and old.fingerprint != fp:
            moved = self.move_aside(reset(old) if reset is not None else _uris(old.outputs))
            for uri, to in moved.items():
                log.info("stage %s: its previous outputs %s moved aside to %s (results change)", name, uri, to)
            superseded.append({"fingerprint": old.fingerprint, "ended": old.ended, "moved": moved})
        rec = StageRecord(
            RUNNING,
            fp,
            config,
            inputs,
            upstream_fps,
            code_version(),
            started=now(),
            ran=True,
            reason=why,
            superseded=superseded,
        )
        self.stages[name] = rec
        self.save()
        try:
            rec.outputs, rec.metrics = work()
        except BaseException as error:  # KeyboardInterrupt too: the record then says where it stopped
            rec.status, rec.error, rec.ended = FAILED, f"{type(error).__name__}: {error}", now()
            if isinstance(error, KeyboardInterrupt):
                rec.status, rec.ended = RUNNING, None  # interrupted: the next run resumes it
            self.save()
            raise
        rec.status, rec.ended = COMPLETE, now()
        self.save()
        log.info("stage %s: complete; outputs %s", name, json.dumps(rec.outputs))
        return rec
