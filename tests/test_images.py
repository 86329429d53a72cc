"""load_image on real files in every mode PIL and OpenCV write: the pixels, not only the shape, against the
conversion written out here (8-bit modes as PIL converts them, 16-bit and float by their range)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sslcore.api.errors import UnreadableImage
from sslcore.toolkit.images import load_image

H, W = 8, 256  # W: one column per 8-bit value, so every ramp below crosses its mode's whole range
SQUARE = (slice(2, 6), slice(8, 16))  # a coloured square on the ramps: the channels must not be swapped


def ramp(maximum: float, dtype: type) -> np.ndarray:
    """H x W, every row from 0 to ``maximum``."""
    return np.tile(np.linspace(0, maximum, W), (H, 1)).round().astype(dtype)


def ramp16(dtype: type = np.uint16) -> np.ndarray:
    """H x W, 0..65535 over all pixels row after row, in steps of about 32: few values are multiples of 257, so
    keeping a sample's high byte (PIL's reduction) instead of value * 255 / 65535 shows as a difference."""
    return np.linspace(0, 65535, H * W).round().astype(dtype).reshape(H, W)


def rgb_pattern() -> np.ndarray:
    """H x W x 3 uint8: red rises 0..255, green falls 255..0, blue is 0 but in a square of (30, 200, 120)."""
    red = ramp(255, np.uint8)
    rgb = np.stack([red, red[:, ::-1], np.zeros_like(red)], axis=2)
    rgb[SQUARE] = (30, 200, 120)
    return rgb


def rgb16_pattern() -> np.ndarray:
    """rgb_pattern at 16 bits per channel: red rises 0..65535, green falls, a square of (10000, 40000, 65535)."""
    red = ramp16()
    rgb = np.stack([red, red[:, ::-1], np.zeros_like(red)], axis=2)
    rgb[SQUARE] = (10000, 40000, 65535)
    return rgb


def from_16_bit(values: np.ndarray) -> np.ndarray:
    """What sslcore promises for 16-bit values: value * 255 / 65535, rounded (no ties: v / 257 is never k + 0.5)."""
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.int64)


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.stack([gray] * 3, axis=2).astype(np.int64)


def mode_of(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def write_png_16(path: Path, samples: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL and OpenCV write no 16-bit gray + alpha): IHDR, one IDAT, IEND."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


# Each case writes one file and returns the RGB load_image must give for it.

def one_bit(path: Path) -> np.ndarray:
    bits = (np.add.outer(np.arange(H), np.arange(W)) % 3 == 0)
    Image.fromarray(bits).save(path)
    return as_rgb(bits * 255)


def gray(path: Path) -> np.ndarray:
    Image.fromarray(ramp(255, np.uint8)).save(path)
    return as_rgb(ramp(255, np.uint8))


def gray_alpha(path: Path) -> np.ndarray:
    level = ramp(255, np.uint8)
    Image.fromarray(np.stack([level, level[:, ::-1]], axis=2)).save(path)  # LA
    return as_rgb(level)


PALETTE = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (30, 200, 120)])


def palette(path: Path, transparency: int | None = None) -> np.ndarray:
    indices = (np.arange(W) // 64).astype(np.uint8)[np.newaxis].repeat(H, axis=0)
    indices[SQUARE] = 4
    image = Image.frombytes("P", (W, H), indices.tobytes())
    image.putpalette(PALETTE.astype(np.uint8).flatten().tolist())
    image.save(path, **({} if transparency is None else {"transparency": transparency}))
    assert mode_of(path) == "P"
    return PALETTE[indices]


def palette_transparent(path: Path) -> np.ndarray:
    return palette(path, transparency=1)  # red is transparent; load_image still gives red


def rgb(path: Path) -> np.ndarray:
    Image.fromarray(rgb_pattern()).save(path, **({"quality": 95, "subsampling": 0} if path.suffix == ".jpg" else {}))
    return rgb_pattern().astype(np.int64)


def rgba(path: Path) -> np.ndarray:
    alpha = ramp(255, np.uint8)[:, ::-1]  # 0 at the right: colour under no alpha is kept, not blended
    Image.fromarray(np.dstack([rgb_pattern(), alpha])).save(path)
    return rgb_pattern().astype(np.int64)


def cmyk(path: Path) -> np.ndarray:
    """Cyan rises, magenta falls, K = 0 but 255 in the square (black whatever PIL's version of the formula)."""
    cyan = ramp(255, np.uint8)
    key = np.zeros_like(cyan)
    key[SQUARE] = 255
    inks = np.stack([cyan, cyan[:, ::-1], np.zeros_like(cyan), key], axis=2)
    Image.frombytes("CMYK", (W, H), inks.tobytes()).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    expected = 255 - inks[:, :, :3].astype(np.int64)
    expected[SQUARE] = 0
    return expected


def ycbcr(path: Path) -> np.ndarray:
    luma = ramp(255, np.uint8)
    ycc = np.stack([luma, np.full_like(luma, 100), luma[:, ::-1] // 2 + 64], axis=2)
    Image.frombytes("YCbCr", (W, H), ycc.tobytes()).save(path)
    y, cb, cr = (ycc[:, :, i].astype(np.float64) for i in range(3))
    jfif = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], axis=2)
    return np.clip(np.round(jfif), 0, 255).astype(np.int64)


def gray16_pil(path: Path) -> np.ndarray:
    Image.fromarray(ramp16()).save(path)  # I;16
    return as_rgb(from_16_bit(ramp16()))


def gray16_big_endian(path: Path) -> np.ndarray:
    Image.frombytes("I;16B", (W, H), ramp16(">u2").tobytes()).save(path)
    assert mode_of(path) == "I;16B"
    return as_rgb(from_16_bit(ramp16()))


def gray16_cv2(path: Path) -> np.ndarray:
    assert cv2.imwrite(str(path), ramp16())  # PNG, TIFF, and PGM (which PIL opens as mode I)
    return as_rgb(from_16_bit(ramp16()))


def int32(path: Path) -> np.ndarray:
    Image.fromarray(ramp16(np.int32)).save(path)
    assert mode_of(path) == "I"
    return as_rgb(from_16_bit(ramp16(np.int32)))


def float_unit(path: Path) -> np.ndarray:
    values = np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))
    Image.fromarray(values).save(path)
    return as_rgb(np.round(values.astype(np.float64) * 255))


def float_bytes(path: Path) -> np.ndarray:
    values = np.tile(np.linspace(0, 255, W, dtype=np.float32) * np.float32(0.999), (H, 1))  # not integers
    Image.fromarray(values).save(path)
    return as_rgb(np.round(values.astype(np.float64)))


def rgb48_cv2(path: Path) -> np.ndarray:
    assert cv2.imwrite(str(path), rgb16_pattern()[:, :, ::-1])  # OpenCV writes BGR
    return from_16_bit(rgb16_pattern())


def rgba64_cv2(path: Path) -> np.ndarray:
    alpha = ramp16()[:, ::-1]
    assert cv2.imwrite(str(path), np.dstack([rgb16_pattern()[:, :, ::-1], alpha]))  # BGRA
    return from_16_bit(rgb16_pattern())


def gray_alpha16_png(path: Path) -> np.ndarray:
    level = ramp16()
    write_png_16(path, np.stack([level, level[:, ::-1]], axis=2), color_type=4)
    return as_rgb(from_16_bit(level))


EXACT, ROUNDING, JPEG = 0, 1, 6  # largest difference allowed from the expected value

CASES: list[tuple[Callable[[Path], np.ndarray], str, int]] = [
    *[(one_bit, suffix, EXACT) for suffix in ("png", "bmp", "tif", "gif")],
    *[(gray, suffix, EXACT) for suffix in ("png", "bmp", "tif", "gif")],
    (gray, "jpg", JPEG),
    *[(gray_alpha, suffix, EXACT) for suffix in ("png", "tif")],
    *[(palette, suffix, EXACT) for suffix in ("png", "bmp", "tif", "gif")],
    *[(palette_transparent, suffix, EXACT) for suffix in ("png", "gif")],
    *[(rgb, suffix, EXACT) for suffix in ("png", "bmp", "tif")],
    (rgb, "jpg", JPEG),
    *[(rgba, suffix, EXACT) for suffix in ("png", "tif")],
    (cmyk, "tif", EXACT),
    (cmyk, "jpg", JPEG),
    (ycbcr, "tif", ROUNDING),
    *[(gray16_pil, suffix, EXACT) for suffix in ("png", "tif")],
    (gray16_big_endian, "tif", EXACT),
    *[(gray16_cv2, suffix, EXACT) for suffix in ("png", "tif", "pgm")],
    (int32, "tif", EXACT),
    *[(float_unit, "tif", ROUNDING), (float_bytes, "tif", ROUNDING)],
    *[(rgb48_cv2, suffix, EXACT) for suffix in ("png", "tif")],
    *[(rgba64_cv2, suffix, EXACT) for suffix in ("png", "tif")],
    (gray_alpha16_png, "png", EXACT),
    (rgb48_cv2, "ppm", ROUNDING),  # maxval 65535: PIL scales it itself
]


@pytest.mark.parametrize(("write", "suffix", "tolerance"), CASES,
                         ids=[f"{write.__name__}-{suffix}" for write, suffix, _ in CASES])
def test_every_mode_decodes_to_its_pixels(tmp_path, write, suffix, tolerance):
    path = tmp_path / f"image.{suffix}"
    expected = write(path)
    image = load_image(str(path))
    assert image.shape == (H, W, 3)
    assert image.dtype == np.uint8
    assert image.flags.writeable
    assert np.abs(image.astype(np.int64) - expected).max() <= tolerance
    assert image.min() < image.max()  # the ramps cross the whole range: nothing came out constant


@pytest.mark.parametrize("write", [
    lambda path: Image.fromarray(ramp16()).save(path),  # I;16
    lambda path: cv2.imwrite(str(path), ramp16()),  # 16-bit gray
    lambda path: cv2.imwrite(str(path), np.stack([ramp16(), ramp16() // 2, ramp16()], axis=2)),  # 48-bit RGB
], ids=["pil-I;16", "cv2-gray16", "cv2-rgb48"])
def test_16_bit_ramp_maps_onto_0_to_255_in_order(tmp_path, write):
    path = tmp_path / "ramp.png"
    write(path)
    image = load_image(str(path))
    for channel in (0, 2):  # gray, or the two full ramps of the RGB file
        levels = image[:, :, channel].flatten().astype(np.int64)  # in the order the ramp rises
        assert levels.min() == 0
        assert levels.max() == 255
        assert (np.diff(levels) >= 0).all()
        assert len(np.unique(levels)) == 256  # 2048 steps over 0..65535: every 8-bit value, none clipped


@pytest.mark.parametrize(("values", "found"), [
    (np.linspace(0, 1000, W), "0..1000"),
    (np.linspace(-5, 1, W), "-5..1"),
    (np.where(np.arange(W) == 7, np.nan, np.linspace(0, 1, W)), f"0..1 and {H} NaN or infinite"),
    (np.where(np.arange(W) < 2, np.inf, np.linspace(0, 255, W)), f"2..255 and {2 * H} NaN or infinite"),
    (np.full(W, np.nan), f"nan..nan and {H * W} NaN or infinite"),
])
def test_floats_outside_0_to_255_are_refused_with_their_range(tmp_path, values, found):
    path = tmp_path / "float.tif"
    Image.fromarray(np.tile(values.astype(np.float32), (H, 1))).save(path)
    with pytest.raises(UnreadableImage) as raised:
        load_image(str(path))
    assert raised.value.path == str(path)
    assert found in raised.value.reason
    assert "mode F" in raised.value.reason
    assert "sslcore expects floats in 0..1 or 0..255" in raised.value.reason
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("low", "high"), [(-100, 65435), (0, 70000)])
def test_32_bit_integers_outside_16_bit_are_refused_with_their_range(tmp_path, low, high):
    path = tmp_path / "int.tif"
    Image.fromarray(np.tile(np.linspace(low, high, W).round().astype(np.int32), (H, 1))).save(path)
    with pytest.raises(UnreadableImage) as raised:
        load_image(str(path))
    assert raised.value.path == str(path)
    assert f"mode I image with values in {low}..{high}" in raised.value.reason
    assert "\n" not in str(raised.value)


DARK = np.tile(np.arange(W, dtype=np.uint16) // 2, (H, 1))  # 0..127: all 0 at value * 255 / 65535


def dark_gray16(path: Path) -> None:
    Image.fromarray(DARK).save(path)


def dark_rgb48(path: Path) -> None:
    assert cv2.imwrite(str(path), np.stack([DARK] * 3, axis=2))


def dark_float(path: Path) -> None:
    Image.fromarray(DARK / np.float32(127000)).save(path)  # 0..0.001


@pytest.mark.parametrize(("write", "suffix", "found"), [
    (dark_gray16, "png", "mode I;16 image with values in 0..127"),
    (dark_rgb48, "png", "16-bit RGB image with values in 0..127"),
    (dark_float, "tif", "mode F (float) image with values in 0..0.001"),
], ids=["I;16-png", "rgb48-png", "F-tif"])
def test_values_that_scaling_would_make_one_are_refused(tmp_path, write, suffix, found):
    path = tmp_path / f"image.{suffix}"
    write(path)
    with pytest.raises(UnreadableImage) as raised:
        load_image(str(path))
    assert found in raised.value.reason
    assert "is the single value 0 at 8 bits" in raised.value.reason
    assert "\n" not in str(raised.value)


def test_a_constant_16_bit_image_stays_constant(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((H, W), 30000, np.uint16)).save(path)
    assert (load_image(str(path)) == round(30000 * 255 / 65535)).all()  # constant in the file, not made so


TRUNCATED = [(gray, "png"), (gray, "jpg"), (rgb, "png"), (rgb, "jpg"), (rgb, "tif"), (gray16_pil, "png"),
             (gray16_pil, "tif"), (rgb48_cv2, "png"), (rgb48_cv2, "tif")]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # PIL's, on the truncated TIFFs
@pytest.mark.parametrize(("write", "suffix"), TRUNCATED, ids=[f"{w.__name__}-{s}" for w, s in TRUNCATED])
def test_truncated_files_are_unreadable(tmp_path, write, suffix):
    whole = tmp_path / f"whole.{suffix}"
    write(whole)
    path = tmp_path / f"truncated.{suffix}"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(UnreadableImage) as raised:
        load_image(str(path))
    assert raised.value.path == str(path)
    assert raised.value.reason
    assert "\n" not in str(raised.value)


def test_a_file_that_is_no_image_is_unreadable(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\nat all\n")
    with pytest.raises(UnreadableImage) as raised:
        load_image(str(path))
    assert raised.value.reason.startswith("UnidentifiedImageError: ")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("suffix", ["gif", "tif"])
def test_multi_frame_files_give_their_first_frame(tmp_path, suffix):
    first = np.zeros((H, W, 3), np.uint8)  # two colours a frame: GIF's palettes keep them exact
    first[SQUARE] = (255, 0, 0)
    second = np.full((H, W, 3), (0, 0, 255), np.uint8)
    path = tmp_path / f"frames.{suffix}"
    Image.fromarray(first).save(path, save_all=True, append_images=[Image.fromarray(second)])
    with Image.open(path) as image:
        assert image.n_frames == 2
    np.testing.assert_array_equal(load_image(str(path)), first)


def test_multi_page_16_bit_tiff_gives_its_first_page(tmp_path):
    path = tmp_path / "pages.tif"
    assert cv2.imwritemulti(str(path), [rgb16_pattern()[:, :, ::-1], rgb16_pattern()[:, ::-1, ::-1]])
    np.testing.assert_array_equal(load_image(str(path)), from_16_bit(rgb16_pattern()))
