"""Image bytes -> RGB, the same way at build time and at query time: content ids, safe decoding, stored copies."""
from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile

MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs
MAX_STORED_BYTES = 1 << 20  # originals above this are stored as a re-encoded JPEG (max side MAX_STORED_SIDE)
MAX_STORED_SIDE = 1024

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey image


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for every mode: CMYK, 16-bit, palette and alpha (composited on white) included; first frame of animations."""
    im.seek(0)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, np.float64)
        arr = arr / 257.0 if arr.max() > 255 else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def decode(data: bytes) -> Image.Image:
    """Decode fully (so truncation surfaces here), refusing decompression bombs."""
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height} exceeds {MAX_PIXELS} pixels (decompression bomb)")
        im.load()
    return im


def stored_bytes(data: bytes, rgb: Image.Image) -> bytes:
    """The original when small enough, else a capped JPEG re-encode."""
    if len(data) <= MAX_STORED_BYTES:
        return data
    im = rgb.copy()
    im.thumbnail((MAX_STORED_SIDE, MAX_STORED_SIDE))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()
