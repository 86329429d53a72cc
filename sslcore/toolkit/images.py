"""Decoding image files for datasets: what a ``register_datasets`` component uses to read a file.

Every file comes out as 8-bit RGB scaled from the range it was written in. PIL's ``convert("RGB")`` alone would
clip a 16-bit grayscale PNG to all 255 and a float TIFF to all 0, and training would go on with constant images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sslcore.api.errors import UnreadableImage

# Everything Pillow raises for a file it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), broken PNG chunks (SyntaxError), bad headers (ValueError, EOFError)
# and images too large to be real (DecompressionBombError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_UINT16_MAX = 65535


def load_image(path: str) -> np.ndarray:
    """Decode ``path`` (its first frame) as an H x W x 3 uint8 RGB array, keeping the file's range.

    - 8-bit modes (1, L, LA, P, RGB, RGBA, CMYK, YCbCr, ...): as PIL converts them to RGB; alpha is dropped.
    - 16-bit grayscale (I;16, I;16B, I;16L) and 32-bit integers (I) within 0..65535: ``value * 255 / 65535``.
    - 32-bit floats (F): values within 0..1 are multiplied by 255; values within 0..255 are kept.
    - 16 bits per channel colour (48/64-bit RGB(A) PNG or TIFF, 16-bit gray+alpha PNG): PIL has no such mode and
      keeps each sample's high byte. Its decoder names these files by their raw mode in ``image.tile``
      ("RGB;16B", "RGBA;16N", "LA;16B"), so only they are decoded again, by OpenCV at full depth, and scaled like
      16-bit grayscale. Every other file costs what PIL's decoding costs.

    Results are rounded. Raises :class:`UnreadableImage` with a one-line reason when the file cannot be decoded,
    for images whose values have no range to scale from without guessing (integers below 0 or above 65535, floats
    outside 0..255, NaN or infinity), and for those that scaling would make constant (a 16-bit image within 0..128).
    """
    try:
        with Image.open(path) as image:
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                return _gray_to_rgb(_high_depth_to_uint8(path, image.mode, np.asarray(image)))
            if _has_16_bit_channels(image):
                return _read_16_bit_channels(path, image)
            if image.mode == "RGB":
                return np.array(image)  # np.array, not asarray: a writable array
            return np.array(image.convert("RGB"))
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(path, " ".join(f"{type(exc).__name__}: {exc}".split())) from exc


def _has_16_bit_channels(image: Image.Image) -> bool:
    """Whether PIL decodes 16-bit samples into this 8-bit colour mode (it would keep only their high byte)."""
    if image.mode not in ("RGB", "RGBA", "LA"):
        return False
    for _decoder, _extent, _offset, args in image.tile:
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _read_16_bit_channels(path: str, image: Image.Image) -> np.ndarray:
    """The file decoded by OpenCV as uint16 gray, BGR or BGRA (the first page of a TIFF), as 8-bit RGB."""
    import cv2  # installed with albumentations; imported here because only 16-bit colour files need it

    try:
        values = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # OpenCV returns None for most broken files, and raises for some
        values = None
    expected_shapes = ((image.height, image.width), (image.height, image.width, 3), (image.height, image.width, 4))
    if values is None or values.dtype != np.uint16 or values.shape not in expected_shapes:
        found = "nothing" if values is None else f"a {values.dtype} array of shape {values.shape}"
        raise UnreadableImage(path, f"16-bit {image.mode} image ({image.width} x {image.height}): OpenCV decoded "
                                    f"{found}")
    colour = values if values.ndim == 2 else values[:, :, 2::-1]  # BGR(A) -> RGB
    rgb = _not_flattened(path, f"16-bit {image.mode}", colour, _uint16_to_uint8(colour))
    return _gray_to_rgb(rgb) if rgb.ndim == 2 else rgb


def _high_depth_to_uint8(path: str, mode: str, values: np.ndarray) -> np.ndarray:
    """One band of 16-bit, 32-bit integer or float values as uint8, or UnreadableImage when the range is unknown."""
    if mode != "F":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > _UINT16_MAX:
            raise UnreadableImage(path, f"mode {mode} image with values in {low}..{high}: sslcore reads integer "
                                        f"images as 16-bit, 0..{_UINT16_MAX}")
        return _not_flattened(path, f"mode {mode}", values, _uint16_to_uint8(values))
    finite = np.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (np.nan, np.nan)
    if not finite.all() or not 0 <= low <= high <= 255:
        not_finite = values.size - int(finite.sum())
        also = f" and {not_finite} NaN or infinite" if not_finite else ""
        raise UnreadableImage(path, f"mode F (float) image with values in {low:g}..{high:g}{also}: sslcore expects "
                                    "floats in 0..1 or 0..255")
    converted = np.rint(values * 255 if high <= 1 else values).astype(np.uint8)
    return _not_flattened(path, "mode F (float)", values, converted)


def _not_flattened(path: str, described: str, values: np.ndarray, converted: np.ndarray) -> np.ndarray:
    """``converted``, or UnreadableImage when scaling made one value of distinct ones: a 16-bit image within 0..128
    comes out all 0, a constant image that training would take for content."""
    if converted.min() == converted.max() and values.min() < values.max():
        raise UnreadableImage(path, f"{described} image with values in {float(values.min()):g}..{float(values.max()):g}"
                                    f" is the single value {converted.flat[0]} at 8 bits: stretch it over its type's "
                                    "range (0..65535 for integers, 0..1 or 0..255 for floats)")
    return converted


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """``value * 255 / 65535`` rounded half up, in integers (exact for every 16-bit value)."""
    return ((values.astype(np.uint32) * 255 + _UINT16_MAX // 2) // _UINT16_MAX).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)
