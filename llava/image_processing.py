"""Image bytes -> model-ready `pixel_values` (float32, channels first, CLIP-normalised).

`decode_image` turns any PIL-readable bytes into an upright RGB image, refusing
bad input with an `ImageError` whose `reason` is a short code a data pipeline can
count ("undecodable", "truncated", "too_many_pixels", "empty").
`preprocess_image` makes the square, normalised array the vision tower expects.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava.config import ImageConfig

_BICUBIC = Image.Resampling.BICUBIC


class ImageError(ValueError):
    """An image that cannot be used. `reason` is a short stable code for counting skipped rows."""

    REASONS = ("undecodable", "truncated", "too_many_pixels", "empty")

    def __init__(self, reason: str, message: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}")
        super().__init__(message)
        self.reason = reason


# --- decoding --------------------------------------------------------------------------------------------------------

_limit_lock = threading.Lock()
_limit_users = 0
_saved_limit: int | None = None


@contextlib.contextmanager
def _without_pil_pixel_limit() -> Iterator[None]:
    """Switch off PIL's global MAX_IMAGE_PIXELS check (our `max_pixels` is the only limit).

    The old value is restored when the last concurrent decode in this process finishes,
    so threads decoding in parallel neither serialise nor leave the global changed.
    """
    global _limit_users, _saved_limit
    with _limit_lock:
        if _limit_users == 0:
            _saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _saved_limit


def _decode_error(exc: Exception, data: bytes) -> ImageError:
    """Classify an exception PIL raised while opening or loading `data`."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError("too_many_pixels", f"PIL refused the image as too large: {exc}")
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return ImageError("truncated", f"image data is truncated ({len(data)} bytes): {exc}")
    if isinstance(exc, UnidentifiedImageError):
        return ImageError("undecodable", f"not a recognised image format (starts with {bytes(data[:8])!r})")
    return ImageError("undecodable", f"cannot decode image: {type(exc).__name__}: {exc}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white, 16/32-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's own I/I;16 -> L conversion clips at 255 (a 16-bit image turns white), so scale instead.
        # float32 in place (4 bytes a pixel, one array): exact for 16-bit values, and a large image costs no
        # float64 copies. Scaling, rounding and clipping give the same uint8 values as float64 would.
        grey = np.array(image, dtype=np.float32)
        if image.mode.startswith("I;16") or grey.max(initial=0) > 255:
            grey /= np.float32(257)
        np.clip(np.rint(grey, out=grey), 0, 255, out=grey)
        image = Image.fromarray(grey.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing anything with more than `max_pixels`.

    The pixel count is read from the header before any pixel data is decoded, so a
    decompression bomb costs only a header parse. Raises `ImageError`.
    """
    if not data:
        raise ImageError("empty", "image bytes are empty")
    with _without_pil_pixel_limit():
        try:
            image = Image.open(io.BytesIO(data))
        except Exception as exc:
            raise _decode_error(exc, data) from exc
        width, height = image.size
        if width * height == 0:
            raise ImageError("empty", f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                "too_many_pixels", f"image is {width}x{height} = {width * height} pixels, over max_pixels={max_pixels}"
            )
        try:
            image.load()
        except Exception as exc:
            raise _decode_error(exc, data) from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block should not cost an otherwise good image
        pass
    try:
        return _to_rgb(image)
    except Exception as exc:  # a mode PIL cannot convert
        raise _decode_error(exc, data) from exc


# --- preprocessing ---------------------------------------------------------------------------------------------------


def _expand_to_square(image: Image.Image, fill: tuple[int, ...], max_pixels: int, size: int) -> Image.Image:
    """Pad to a square canvas of colour `fill`, image centred (LLaVA-1.5 llava/mm_utils.py expand2square).

    A canvas larger than `max_pixels` is avoided by first shrinking the image (only very wide/tall inputs).
    """
    width, height = image.size
    side = max(width, height)
    limit = max(size, math.isqrt(max_pixels))
    if side > limit:
        scale = limit / side
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), _BICUBIC)
        width, height = image.size
        side = max(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_shortest_edge_and_centre_crop(image: Image.Image, size: int, max_pixels: int) -> Image.Image:
    """CLIP's resize(shortest_edge=size) + center_crop(size) (transformers image_transforms.py).

    Bit-exact with transformers' CLIPImageProcessor unless the resized image would exceed `max_pixels`
    (very wide/tall inputs): then only the crop window is resampled, which can differ by one uint8 level.
    """
    width, height = image.size
    new_long = int(size * max(width, height) / min(width, height))  # same rounding as transformers
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if new_w * new_h <= max_pixels:
        return image.resize((new_w, new_h), _BICUBIC).crop((left, top, left + size, top + size))
    # PIL's `box` still draws filter taps from the whole image, so this is resize-then-crop up to float rounding.
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return image.resize((size, size), _BICUBIC, box=box)


def preprocess_image_uint8(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """Image -> uint8 array (3, size, size), channels first: squared per `config.aspect`, not yet normalised.

    `normalise_pixels(preprocess_image_uint8(image, config), config.mean, config.std)` is exactly
    (bit for bit) `preprocess_image(image, config)`; the uint8 form is 4x smaller to store or ship.
    A non-RGB image is first converted like `decode_image` does (alpha onto white).
    """
    image = _to_rgb(image)
    size = config.size
    if config.aspect == "pad":
        fill = tuple(int(m * 255) for m in config.mean)
        image = _expand_to_square(image, fill, config.max_pixels, size).resize((size, size), _BICUBIC)
    elif config.aspect == "resize":
        image = image.resize((size, size), _BICUBIC)
    elif config.aspect == "crop":
        image = _resize_shortest_edge_and_centre_crop(image, size, config.max_pixels)
    else:
        raise ValueError(f"unknown aspect {config.aspect!r}")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def normalise_pixels(pixels: np.ndarray, mean, std, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 pixels (..., 3, H, W) -> float32 (x / 255 - mean) / std per channel, in float32 throughout.

    `out` (float32, same shape) is filled and returned when given. The arithmetic is the same
    element by element as `preprocess_image` always did, so results are bit-identical to it.
    """
    if out is None:
        out = pixels.astype(np.float32)
    else:
        np.copyto(out, pixels, casting="unsafe")
    out /= np.float32(255)
    out -= np.asarray(mean, np.float32)[:, None, None]
    out /= np.asarray(std, np.float32)[:, None, None]
    return out


def preprocess_image(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """Image -> float32 array (3, size, size): square it per `config.aspect`, rescale by 1/255, normalise.

    A non-RGB image is first converted like `decode_image` does (alpha onto white).
    """
    return normalise_pixels(preprocess_image_uint8(image, config), config.mean, config.std)


def load_pixel_values(data: bytes, config: ImageConfig) -> np.ndarray:
    """Image bytes -> (3, size, size) float32 pixel values. Raises `ImageError`."""
    return preprocess_image(decode_image(data, config.max_pixels), config)


def load_pixels_uint8(data: bytes, config: ImageConfig) -> np.ndarray:
    """Image bytes -> (3, size, size) uint8 pixels before normalisation (see `normalise_pixels`). Raises `ImageError`."""
    return preprocess_image_uint8(decode_image(data, config.max_pixels), config)
