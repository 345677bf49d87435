"""Tests for llava.image_processing: decoding edge cases, aspect modes, CLIP parity, refusals."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from llava.config import CLIP_MEAN, CLIP_STD, ImageConfig
from llava.image_processing import (
    ImageError,
    decode_image,
    load_pixel_values,
    preprocess_image,
)

BIG = 10_000_000  # max_pixels that never gets in the way


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of all zeros: the header says width x height, the file is tiny."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- decoding: every mode ends up RGB ---------------------------------------------------------------------------------


def test_grayscale_decodes_to_rgb():
    image = decode_image(encode(Image.new("L", (7, 5), 100)), BIG)
    assert image.mode == "RGB" and image.size == (7, 5)
    assert image.getpixel((3, 2)) == (100, 100, 100)


def test_16bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535], [1000, 0, 0]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = decode_image(encode(source), BIG)
    assert image.mode == "RGB" and image.size == (3, 2)
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == (128, 128, 128)
    assert image.getpixel((2, 0)) == (255, 255, 255)
    assert image.getpixel((0, 1)) == (4, 4, 4)  # PIL's own convert would clip 1000 to 255


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_white(mode):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    image = decode_image(encode(rgba.convert(mode)), BIG)
    assert image.mode == "RGB" and image.size == (4, 4)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in image.getpixel((1, 0)))
    if mode == "RGBA":
        assert image.getpixel((2, 2)) == (255, 0, 0)


def test_palette_with_transparency_composites_onto_white():
    palette = Image.new("P", (6, 3), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 black, index 1 blue
    palette.putpixel((0, 0), 0)
    data = encode(palette, transparency=0)  # index 0 is transparent
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    image = decode_image(data, BIG)
    assert image.mode == "RGB" and image.size == (6, 3)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((5, 2)) == (0, 0, 255)


def test_palette_without_transparency():
    image = decode_image(encode(Image.new("RGB", (5, 5), (10, 200, 30)).convert("P")), BIG)
    assert image.mode == "RGB" and image.size == (5, 5)


def test_cmyk_jpeg_decodes_to_rgb():
    data = encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data, BIG)
    assert image.mode == "RGB" and image.size == (30, 20)
    assert np.allclose(image.getpixel((15, 10)), (255, 0, 0), atol=8)


@pytest.mark.parametrize("orientation, red_corner", [(6, "top_right"), (8, "bottom_left")])
def test_exif_orientation_is_applied(orientation, red_corner):
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = decode_image(encode(stored, "JPEG", quality=95, exif=exif), BIG)
    assert image.size == (32, 64)  # 6 = rotate 90 CW for display, 8 = rotate 90 CCW: either way W/H swap
    corners = {"top_left": (4, 4), "top_right": (27, 4), "bottom_left": (4, 59), "bottom_right": (27, 59)}
    for name, xy in corners.items():
        r, g, b = image.getpixel(xy)
        assert (r > 200 and b < 60) if name == red_corner else (b > 200 and r < 60), (name, image.getpixel(xy))


# --- preprocessing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aspect", ["pad", "resize", "crop"])
@pytest.mark.parametrize("wh", [(1, 1), (4000, 3), (3, 4000), (50, 20)])
def test_any_shape_gives_square_finite_output(aspect, wh):
    config = ImageConfig(size=32, aspect=aspect)
    pixels = preprocess_image(random_rgb(*wh), config)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()


def test_pad_shrinks_first_when_canvas_would_exceed_max_pixels():
    config = ImageConfig(size=16, aspect="pad", max_pixels=10_000)  # a 20000x2 canvas would be 400M pixels
    pixels = preprocess_image(random_rgb(20_000, 2), config)
    assert pixels.shape == (3, 16, 16) and np.isfinite(pixels).all()


def test_pad_fills_with_mean_colour_and_centres_the_image():
    config = ImageConfig(size=30, aspect="pad")
    pixels = preprocess_image(Image.new("RGB", (60, 20), (255, 0, 0)), config)  # 60x60 canvas, image rows 20..39
    # After the 2x bicubic downscale (taps reach 4 source rows) rows 0..7 and 22..29 see only padding, which is the
    # mean colour, i.e. ~0 after normalisation; the residue is int(m * 255) truncation: < 1/255/std ~ 0.015.
    assert np.abs(pixels[:, :8]).max() < 0.015
    assert np.abs(pixels[:, 22:]).max() < 0.015
    # Rows 12..17 see only the (centred) image, across the full width.
    red = (np.array([1.0, 0.0, 0.0]) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(pixels[:, 12:18], red[:, None, None], atol=1e-5)


def test_resize_squashes_the_whole_image():
    left_red = Image.new("RGB", (40, 10), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 20, 10))
    pixels = preprocess_image(left_red, ImageConfig(size=20, aspect="resize"))
    assert pixels[0, :, :8].min() > 1.5 and pixels[0, :, 12:].max() < -1.5  # left half red, right half not


def clip_processor(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("wh", [(100, 60), (45, 130), (37, 37), (300, 7), (20, 20), (641, 479)])
def test_crop_matches_transformers_clip_processor(size, wh):
    image = random_rgb(*wh, seed=sum(wh))
    expected = clip_processor(size)(images=image, return_tensors="np")["pixel_values"][0]
    ours = preprocess_image(image, ImageConfig(size=size, aspect="crop"))
    assert ours.shape == expected.shape == (3, size, size)
    assert np.abs(ours - expected).max() < 1e-6  # same uint8 PIL resize and float32 maths: observed bit-identical


@pytest.mark.parametrize("wh", [(100, 60), (45, 130), (300, 7)])
def test_crop_window_resample_is_within_one_level_of_clip(wh):
    # max_pixels below the resized size forces the crop-window-only path used for very wide/tall images
    image = random_rgb(*wh, seed=sum(wh))
    expected = clip_processor(224)(images=image, return_tensors="np")["pixel_values"][0]
    ours = preprocess_image(image, ImageConfig(size=224, aspect="crop", max_pixels=224 * 224))
    one_level = 1 / 255 / min(CLIP_STD)
    assert np.abs(ours - expected).max() < one_level + 1e-5
    assert (np.abs(ours - expected) > 1e-5).mean() < 1e-3  # float rounding flips a rare pixel by one level


def test_load_pixel_values_gives_float32_channels_first_at_the_configured_size():
    config = ImageConfig(size=24)
    arrays = [load_pixel_values(encode(random_rgb(30 + i, 20, seed=i), "JPEG"), config) for i in range(3)]
    assert all(a.dtype == np.float32 and a.shape == (3, 24, 24) for a in arrays)


# --- refusals --------------------------------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_from_the_header():
    data = png_bomb(20_000, 20_000)
    assert len(data) < 100_000  # 400M pixels in < 100 KB
    before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=64_000_000)
    assert time.perf_counter() - start < 1.0  # no full decode (that would allocate 400 MB)
    assert info.value.reason == "too_many_pixels"
    assert "20000x20000" in str(info.value) and "64000000" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global is left as it was


def test_too_many_pixels_small_image():
    with pytest.raises(ImageError) as info:
        decode_image(encode(random_rgb(100, 100)), max_pixels=5000)
    assert info.value.reason == "too_many_pixels"
    assert "100x100" in str(info.value) and "5000" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_pil_global_limit_does_not_interfere(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would warn above 100 and refuse above 200 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode_image(encode(random_rgb(64, 64), "GIF"), max_pixels=BIG)
    assert image.size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_concurrent_decodes_restore_pil_global():
    from concurrent.futures import ThreadPoolExecutor

    before = Image.MAX_IMAGE_PIXELS
    blobs = [encode(random_rgb(200, 150, seed=i), "PNG") for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda b: decode_image(b, BIG).size, blobs))
    assert sizes == [(200, 150)] * 32
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_image(fmt, fraction):
    data = encode(random_rgb(120, 80), fmt)
    with pytest.raises(ImageError) as info:
        decode_image(data[: int(len(data) * fraction)], BIG)
    assert info.value.reason == "truncated"
    assert "truncated" in str(info.value)


def test_garbage_is_undecodable():
    garbage = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError) as info:
        decode_image(garbage, BIG)
    assert info.value.reason == "undecodable"
    assert "not a recognised image format" in str(info.value)


def test_empty_bytes():
    with pytest.raises(ImageError) as info:
        decode_image(b"", BIG)
    assert info.value.reason == "empty"
    assert "empty" in str(info.value)


def test_load_pixel_values_propagates_image_error():
    with pytest.raises(ImageError) as info:
        load_pixel_values(encode(random_rgb(100, 100)), ImageConfig(size=16, max_pixels=5000))
    assert info.value.reason == "too_many_pixels"
