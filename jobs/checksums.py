"""Write or verify a directory's sha256 manifest (`_checksums.json`): vouch for a checkpoint you trust, or check one.

`llava-ray checksums write DIR` lists every file under DIR with its sha256 (use it on a checkpoint that
llava-ray did not write, e.g. a DeepSpeed checkpoint from another tool, once you trust it: resuming
from a checkpoint without a manifest is refused). `llava-ray checksums verify DIR` re-hashes every
listed file and exits 1 naming the first that differs or is missing.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("write", "verify"), help="write a manifest, or verify one")
    parser.add_argument("directory", help="a local directory (a checkpoint, an export, a run's checkpoint dir)")


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from llava.artifact_manifest import ManifestError, verify, write_manifest

    if args.action == "write":
        emit({"manifest": str(write_manifest(args.directory))})
        return 0
    try:
        listed = verify(args.directory)
    except ManifestError as error:
        emit({"ok": False, "error": str(error)})
        return 1
    emit({"ok": True, "files": len(listed), "directory": args.directory})
    return 0
