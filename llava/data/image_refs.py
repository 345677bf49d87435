"""Image references in input files (LLaVA JSON rows, caption pairs, question files), confined and capped.

An input file names its images by path, e.g. ``"image": "coco/train2017/000000033471.jpg"``,
relative to the images root the user passes (``--images``, local or ``s3://bucket/prefix``).
Input files often come from elsewhere, so a reference is only followed when it stays inside that
root: an absolute path (``/etc/passwd``, ``/dev/zero``), a ``..`` that climbs out of the root, or a
URI of another bucket or prefix is refused with the reason ``image_outside_root`` unless the user
opts out (``ImageAccess(allow_outside_root=True)``, ``--allow-images-outside-root``). The check is
on the path text; symbolic links inside a local root are followed (whoever owns the root put them
there).

Every read is capped: more than ``max_bytes`` (default 32 MiB; the largest LLaVA training image is
a few MB) is refused with the reason ``image_too_large``, after reading at most ``max_bytes + 1``
bytes, so a reference to an endless or huge file cannot exhaust memory.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Optional

from llava import storage
from llava.templates import SampleRejected

DEFAULT_MAX_IMAGE_BYTES = 32 << 20


class ImageRefRejected(SampleRejected):
    """An image reference the policy refuses; ``reason`` is ``image_outside_root`` or ``image_too_large``."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class ImageAccess:
    """Where image references may point and how many bytes a read may return."""

    root: Optional[str] = None  # the images root (local path or s3:// URI); None: no relative references
    allow_outside_root: bool = False  # follow absolute paths, `..` and other buckets as given
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self):
        if self.max_bytes <= 0:
            raise ValueError(f"max image bytes must be positive, got {self.max_bytes}")

    def resolve(self, ref: str) -> str:
        """The URI ``ref`` names (relative ones under the root). Raises ImageRefRejected(image_outside_root)."""
        ref = str(ref)
        absolute = storage.is_s3(ref) or ref.startswith(("/", "file://", "~"))
        if self.allow_outside_root:
            return ref if absolute or self.root is None else storage.join(self.root, ref)
        if self.root is None:
            raise ImageRefRejected("image_outside_root", f"{ref!r}: no images root was given for image paths")
        if storage.is_s3(self.root):
            candidate = ref if absolute else f"{self.root.rstrip('/')}/{ref}"
            if not storage.is_s3(candidate):
                raise self._outside(ref)
            bucket, _, key = candidate[len("s3://") :].partition("/")
            path = "s3://" + bucket + "/" + posixpath.normpath("/" + key).lstrip("/")
            root = self.root.rstrip("/")
        else:
            if storage.is_s3(ref) or ref.startswith("~"):
                raise self._outside(ref)
            root = os.path.normpath(storage.filesystem(self.root)[1])
            local = ref[len("file://") :] if ref.startswith("file://") else ref
            path = os.path.normpath(os.path.join(root, local))  # an absolute `local` replaces root
        if not _inside(path, root) or path == root:
            raise self._outside(ref)
        return path

    def _outside(self, ref: str) -> ImageRefRejected:
        return ImageRefRejected(
            "image_outside_root",
            f"{ref!r} is not inside the images root {self.root} (pass --allow-images-outside-root to follow it)",
        )

    def read(self, uri: str) -> bytes:
        """The bytes at an already resolved ``uri``, at most ``max_bytes``. Raises ImageRefRejected(image_too_large)."""
        try:
            return storage.read_bytes(uri, max_bytes=self.max_bytes)
        except storage.TooLargeError as error:
            raise ImageRefRejected(
                "image_too_large", f"{uri}: more than {self.max_bytes} bytes (raise --max-image-bytes to accept it)"
            ) from error

    def size(self, uri: str) -> Optional[int]:
        """The stored size of an already resolved ``uri``, or None when it cannot be found."""
        try:
            return storage.size(uri)
        except (FileNotFoundError, storage.StorageError):
            return None
