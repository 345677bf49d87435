"""Publish a local artifact directory (one with its manifest, llava/artifact_manifest.py) to a local path or
S3 prefix as a whole.

Kept apart from artifact_manifest.py, which llava/storage.py uses to mirror S3 artifacts: publishing writes
through llava.storage, and one module doing both would make storage and the manifest import each other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llava import storage
from llava.artifact_manifest import (
    MANIFEST_FILE,
    ManifestError,
    _holds_manifest,
    _relative_files,
    clear_destination,
    incomplete_manifest,
    is_manifest_name,
    read_local,
)


def publish(local_dir: str | Path, uri: str) -> None:
    """Replace the directory or S3 prefix `uri` with `local_dir` (which has its manifest): the old
    content is marked incomplete and removed first, the manifest(s) uploaded last, so a reader sees the
    old artifact, a refusal, or the new artifact, never a mix."""
    local_dir = Path(local_dir)
    read_local(local_dir)  # it has a complete manifest
    files = _relative_files(local_dir)
    data_files = [rel for rel in files if not is_manifest_name(rel)]
    manifests = [rel for rel in files if is_manifest_name(rel)]
    if not storage.is_s3(uri):
        target = clear_destination(storage.filesystem(uri)[1])
        for rel in data_files + manifests:  # the manifests last
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local_dir / rel, target / rel)
        return
    existing = storage.list_files(uri) if storage.exists(uri) else []
    names = [u[len(uri.rstrip("/")) + 1 :] for u in existing]
    if names and not _holds_manifest(names):
        raise ManifestError(
            f"{uri}: not empty and not a previous llava-ray artifact (no {MANIFEST_FILE}): "
            f"refusing to overwrite it; choose an empty or new prefix"
        )
    if names:
        storage.write_text(storage.join(uri, MANIFEST_FILE), incomplete_manifest())  # readers refuse it from here on
        for name in names:
            if name != MANIFEST_FILE:
                storage.remove(storage.join(uri, name))
    with tempfile.TemporaryDirectory() as staging:  # the data files (hard links where possible), then the manifests
        for rel in data_files:
            Path(staging, rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local_dir / rel, Path(staging, rel))
            except OSError:
                shutil.copyfile(local_dir / rel, Path(staging, rel))
        if data_files:
            storage.upload_dir(staging, uri)
    for rel in manifests:
        storage.write_bytes(storage.join(uri, rel), (local_dir / rel).read_bytes())
