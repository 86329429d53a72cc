"""Decoding image files for datasets: what a ``register_datasets`` component uses to read a file."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sslcore.api.errors import UnreadableImage

# Everything Pillow raises for a file it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), broken PNG chunks (SyntaxError), bad headers (ValueError, EOFError)
# and images too large to be real (DecompressionBombError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_image(path: str) -> np.ndarray:
    """Decode ``path`` as an H x W x 3 uint8 RGB array (grayscale, palette, RGBA and CMYK are converted).

    Raises :class:`UnreadableImage` when the file cannot be opened or decoded.
    """
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # np.array, not asarray: a writable array
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(path, f"{type(exc).__name__}: {exc}") from exc


