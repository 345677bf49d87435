"""Checksum manifests: every file of a checkpoint or export listed with its size and sha256.

A directory that llava-ray writes (a model checkpoint, a training checkpoint, an HF export) ends with
``_checksums.json``, written last:

    {"format": "llava-ray-checksums/1", "complete": true,
     "files": {"projector.safetensors": {"size": 1234, "sha256": "ab12..."}, "llm/config.json": {...}}}

A directory written by several processes (a Ray Train checkpoint: each training worker adds its own
DeepSpeed shard) holds one part per writer, ``_checksums.rank<R>-of-<W>.json``, each listing that
writer's files; all W parts must be present.

Loaders call :func:`verify` before reading anything: every listed file must exist with its size and
sha256 (else the error names the file: missing, truncated or tampered), and a file that no manifest
lists is refused too, since loaders find files by name (DeepSpeed's resume unpickles what it finds,
transformers prefers ``model.safetensors`` to a sharded index). So a planted, truncated or modified file
is refused before it is deserialised. A directory being rewritten carries an incomplete manifest
(``"complete": false``) until its last file is written; loading it is refused.

What this protects against: corrupt or partial copies and files changed or added after the writer
finished. It is not a signature: whoever can write the directory can also rewrite its manifest, so write
access to checkpoint and model storage stays the trust boundary (serving roles read-only).

Directories written before manifests existed have none: :func:`verify` raises :class:`NoManifestError`,
which model loaders turn into a warning and a training resume into a refusal (DeepSpeed unpickles the
optimizer state). ``llava-ray checksums write DIR`` vouches for such a directory once its
owner trusts it; ``llava-ray checksums verify DIR`` checks one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_FILE = "_checksums.json"
FORMAT = "llava-ray-checksums/1"
_PART = re.compile(r"^_checksums\.rank(\d+)-of-(\d+)\.json$")
_BLOCK = 8 << 20


class ManifestError(ValueError):
    """A directory does not match its manifest; the message names the directory and the file."""


class NoManifestError(ManifestError):
    """The directory has no checksum manifest (written before manifests, or not by llava-ray)."""


@dataclass(frozen=True)
class Entry:
    size: int
    sha256: str


def part_name(rank: int, world_size: int) -> str:
    return f"_checksums.rank{rank}-of-{world_size}.json"


def is_manifest_name(name: str) -> bool:
    """A manifest file at the top of a directory (``name`` relative to it)."""
    return name == MANIFEST_FILE or bool(_PART.match(name))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _relative_files(directory: Path) -> list[str]:
    """Every file under `directory`, as sorted POSIX paths relative to it."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            found.append(Path(root, name).relative_to(directory).as_posix())
    return sorted(found)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_manifest(directory: str | Path, part: tuple[int, int] | None = None) -> Path:
    """List every file under `directory` (except top-level manifests) with size and sha256; call it last.

    `part=(rank, world_size)`: this writer's part of a directory several processes fill."""
    directory = Path(directory)
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
        for rel in _relative_files(directory)
        if not is_manifest_name(rel)
    }
    data: dict = {"format": FORMAT, "complete": True, "files": files}
    if part is not None:
        data["part"] = {"rank": part[0], "of": part[1]}
    path = directory / (MANIFEST_FILE if part is None else part_name(*part))
    _write_json(path, data)
    return path


def incomplete_manifest() -> str:
    """The manifest a directory carries while it is being rewritten: loading it is refused."""
    return json.dumps({"format": FORMAT, "complete": False, "files": {}})


def _safe_relative(rel: str, where: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"{where}: the manifest lists {rel!r}, which is not a plain relative path")
    return rel


def combine(texts: dict[str, str], where: str) -> dict[str, Entry]:
    """The files listed by a directory's manifests (`{manifest name: its text}`), checked for consistency:
    a known format, complete, every part of a multi-writer directory present, no file listed twice differently."""
    if not texts:
        raise NoManifestError(f"{where}: no {MANIFEST_FILE} (written before checksum manifests, or not by llava-ray)")
    listed: dict[str, Entry] = {}
    worlds: set[int] = set()
    ranks: set[int] = set()
    for name, text in sorted(texts.items()):
        try:
            data = json.loads(text)
            files = data["files"]
            complete, fmt = data["complete"], data["format"]
        except (ValueError, KeyError, TypeError) as error:
            raise ManifestError(f"{where}/{name}: not a checksum manifest ({error})") from error
        if fmt != FORMAT:
            raise ManifestError(f"{where}/{name}: unknown manifest format {fmt!r} (expected {FORMAT})")
        if complete is not True:
            raise ManifestError(f"{where}: being written (its {name} is marked incomplete): try again once it is done")
        match = _PART.match(name)
        if match:
            ranks.add(int(match.group(1)))
            worlds.add(int(match.group(2)))
        for rel, entry in files.items():
            rel = _safe_relative(rel, where)
            new = Entry(int(entry["size"]), str(entry["sha256"]))
            if listed.get(rel, new) != new:
                raise ManifestError(f"{where}: {rel} is listed twice with different checksums")
            listed[rel] = new
    if worlds:
        if len(worlds) > 1:
            raise ManifestError(f"{where}: manifest parts of different writer counts {sorted(worlds)}")
        (world,) = worlds
        missing = sorted(set(range(world)) - ranks)
        if missing:
            raise ManifestError(
                f"{where}: manifest part(s) {', '.join(part_name(r, world) for r in missing)} "
                f"missing: a writer's files are not accounted for"
            )
    return listed


def read_local(directory: str | Path) -> dict[str, Entry]:
    """The files `directory`'s manifests list (see :func:`combine`); nothing is hashed."""
    directory = Path(directory)
    texts = (
        {p.name: p.read_text() for p in directory.iterdir() if p.is_file() and is_manifest_name(p.name)}
        if directory.is_dir()
        else {}
    )
    return combine(texts, str(directory))


def verify(directory: str | Path) -> dict[str, Entry]:
    """Check `directory` against its manifests before anything in it is read; returns the listed files.

    Raises :class:`NoManifestError` without a manifest, :class:`ManifestError` naming the first file that is
    missing, truncated (or grown), tampered with (sha256 differs) or present but listed by no manifest."""
    directory = Path(directory)
    listed = read_local(directory)
    for rel, entry in sorted(listed.items()):
        file = directory / rel
        if not file.is_file():
            raise ManifestError(f"{directory}: {rel} is listed in its manifest but missing")
        size = file.stat().st_size
        if size != entry.size:
            what = "truncated" if size < entry.size else "larger than listed"
            raise ManifestError(f"{directory}: {rel} is {what}: {size} bytes, the manifest says {entry.size}")
        if sha256_file(file) != entry.sha256:
            raise ManifestError(f"{directory}: {rel} was modified: its sha256 differs from the manifest's")
    extra = [rel for rel in _relative_files(directory) if rel not in listed and not is_manifest_name(rel)]
    if extra:
        raise ManifestError(
            f"{directory}: {extra[0]} is not listed in its manifest (refusing a directory with "
            f"unlisted files{f', {len(extra)} in all' if len(extra) > 1 else ''})"
        )
    return listed


def verify_or_warn(directory: str | Path, what: str = "model") -> bool:
    """:func:`verify`; a directory without manifest (written before them) loads with a warning. True if verified."""
    try:
        verify(directory)
    except NoManifestError:
        log.warning(
            "%s %s has no %s: its files are not verified (written before checksum manifests, or not "
            "by llava-ray; `llava-ray checksums write DIR` vouches for it)",
            what,
            directory,
            MANIFEST_FILE,
        )
        return False
    return True


# ---- replacing a directory as a whole -----------------------------------------------------------------------


def _holds_manifest(names: list[str]) -> bool:
    return any(is_manifest_name(n) for n in names)


def clear_destination(out: str | Path) -> Path:
    """Make the local directory `out` ready for a fresh artifact: missing or empty is fine; a previous
    artifact (it holds a manifest) is marked incomplete, then emptied; anything else is refused, so a
    mistyped output path never deletes unrelated files and old and new files are never mixed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ManifestError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in out.iterdir()]
    if not names:
        return out
    if not _holds_manifest(names):
        raise ManifestError(
            f"{out}: not empty and not a previous llava-ray artifact (no {MANIFEST_FILE}): "
            f"refusing to overwrite it; choose an empty or new directory"
        )
    (out / MANIFEST_FILE).write_text(incomplete_manifest())  # readers refuse it from here on
    for path in out.iterdir():
        if path.name != MANIFEST_FILE:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return out
