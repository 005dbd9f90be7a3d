"""Image bytes -> upright RGB -> model pixels: the one path every job takes (index, query, eval, training, bench).

Decoding refuses bombs and truncated files, applies the EXIF orientation, converts CMYK/ICC/16-bit/palette/alpha
to sRGB, keeps the first frame of animations and shrinks very large photos while decoding (JPEG draft mode), so a
phone photo and its rotated copy give the same pixels. Preprocessing is open_clip's eval transform split in two:
the geometric part (resize, crop) gives uint8 pixels that are cheap to ship between processes; normalising them
is the encoder's first step.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageFile, ImageOps

from bicascade import exif
from bicascade.errors import BadInputError

if TYPE_CHECKING:  # torch is imported where pixels become tensors, not by every decode task
    import torch

MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs (checked before decoding)
MAX_UPLOAD_BYTES = 8 << 20  # a query image sent by a client
MAX_UPLOAD_PIXELS = 25_000_000
DECODE_SIDE = 1024  # photos are shrunk while decoding to no less than this on the short side: enough for any level
MAX_STORED_BYTES = 1 << 20  # originals above this are stored as a re-encoded JPEG (max side MAX_STORED_SIDE)
MAX_STORED_SIDE = 1024
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey image
pillow_heif.register_heif_opener()  # HEIC/HEIF: what iPhones write
_SRGB = ImageCms.createProfile("sRGB")


def content_id(data: bytes) -> str:
    """The stable key of an image: a hash of its bytes (the same file twice is one row)."""
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass
class Decoded:
    """An upright RGB image, the upright size of the original (the image itself may have been shrunk) and what the
    file says about its capture."""

    rgb: Image.Image
    width: int
    height: int
    capture: exif.Capture


def _open(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    if not data:
        raise BadInputError("empty file")
    with warnings.catch_warnings(record=True) as said:  # what Pillow skipped while parsing (broken EXIF tags)
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadInputError(f"decompression bomb: {e}") from None
        except Exception as e:  # PIL raises several types for "not an image"
            raise BadInputError(f"not an image ({type(e).__name__}: {e})") from None
    if im.width * im.height > max_pixels:
        raise BadInputError(f"{im.width}x{im.height} exceeds {max_pixels} pixels (decompression bomb)")
    im.info[exif.PARSE_WARNINGS] = [str(w.message) for w in said]
    return im


def header(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone, refusing what is not an image or has over `max_pixels` pixels."""
    im = _open(data, max_pixels)
    return im.width, im.height


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for every mode: ICC profiles to sRGB, CMYK, 16-bit, palette and alpha (composited on white)."""
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "CMYK", "L"):
        with contextlib.suppress(ImageCms.PyCMSError, OSError, ValueError):  # a broken profile: plain conversion
            im = ImageCms.applyTransform(im, _to_srgb(icc, im.mode))
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, np.float64)
        arr = arr / 257.0 if arr.max() > 255 else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")


@lru_cache(maxsize=32)
def _to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """A colour transform from an embedded profile to sRGB (built once per distinct profile: it costs ms)."""
    return ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, mode, "RGB")


def _upright(im: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """`size` (the original's) as the picture stands upright: swapped when its EXIF orientation turns it; a
    malformed block turns nothing (exif.read says so)."""
    with contextlib.suppress(Exception):
        if im.getexif().get(0x0112, 1) in ROTATED:
            return size[1], size[0]
    return size


def decode(data: bytes, min_side: int = DECODE_SIDE, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode fully (so truncation surfaces here) into an upright RGB image whose short side is shrunk towards
    `min_side` where the format allows it cheaply; width and height are the original's, upright. The header is
    checked against `max_pixels` before any pixel is decoded."""
    im = _open(data, max_pixels)
    width, height = im.size  # of the original, before any shrinking
    try:
        im.seek(0)  # animations: the first frame
        if im.format == "JPEG" and min(im.size) > 2 * min_side:
            im.draft(im.mode, (min_side, min_side))  # decode at 1/2, 1/4 or 1/8 scale, never below min_side
        im.load()
        capture = exif.read(im)  # after load: TIFF has its tags only then
        width, height = _upright(im, (width, height))
        with contextlib.suppress(Exception):  # a malformed orientation: the picture as stored
            im = ImageOps.exif_transpose(im)
        rgb = to_rgb(im)
    except BadInputError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadInputError(f"cannot decode ({type(e).__name__}: {e})") from None
    if min(rgb.size) > 2 * min_side:  # formats without draft mode: shrink once here, not in every transform
        scale = min_side / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC,
                         reducing_gap=3.0)
    return Decoded(rgb, width, height, capture)


@dataclass
class Header:
    """What a file's header says: its upright size and capture metadata, no pixels decoded."""

    width: int
    height: int
    capture: exif.Capture


def device_jpeg(data: bytes, max_pixels: int = MAX_PIXELS) -> Header | None:
    """The header of a JPEG that a GPU decodes to the pixels `decode` gives (RGB or grey, no colour profile or an
    sRGB one: the GPU applies no ICC transform); None for everything the CPU must decode (other formats, CMYK,
    Display P3 and other profiles, files that fail to open: `decode` says why)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        im = _open(data, max_pixels)
    except BadInputError:
        return None
    icc = im.info.get("icc_profile")
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or (icc and b"sRGB" not in icc[:1024]):
        return None
    return Header(*_upright(im, im.size), exif.read(im))


def decode_jpegs(datas: Sequence[bytes], device: str | torch.device) -> list[torch.Tensor | None]:
    """Upright uint8 (3, H, W) RGB tensors decoded on `device` in one call (nvJPEG on a GPU, EXIF orientation
    applied); None where the device refused a file: decode that one with `decode`, on the CPU. (torchvision 0.29
    deprecates its image codecs for TorchCodec's, which needs FFmpeg; they still work.)"""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    kw = {"mode": ImageReadMode.RGB, "device": device, "apply_exif_orientation": True}
    try:
        return list(decode_jpeg(tensors, **kw))
    except RuntimeError:  # one bad file fails the batch: find it
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, **kw))
            except RuntimeError:
                out.append(None)
        return out


def stored_jpeg(rgb: torch.Tensor, data: bytes) -> bytes:
    """`stored_bytes` of an image decoded on a device: the original when small enough, else the upright image at
    MAX_STORED_SIDE, resized and JPEG-encoded on that device."""
    import torch
    from torchvision.io import encode_jpeg

    if len(data) <= MAX_STORED_BYTES:
        return data
    h, w = rgb.shape[1:]
    scale = min(1.0, MAX_STORED_SIDE / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = torch.nn.functional.interpolate(rgb[None].float(), size=size, mode="bicubic", antialias=True)[0]
    return encode_jpeg(small.round_().clamp_(0, 255).to(torch.uint8), quality=90).cpu().numpy().tobytes()


def decode_file(path: str | Path, min_side: int = DECODE_SIDE) -> Decoded:
    return decode(Path(path).read_bytes(), min_side)


def stored_bytes(data: bytes, decoded: Decoded) -> bytes:
    """The original when small enough, else a capped JPEG re-encode of the upright image."""
    if len(data) <= MAX_STORED_BYTES:
        return data
    return jpeg(decoded.rgb, MAX_STORED_SIDE, quality=90)


def jpeg(rgb: Image.Image, max_side: int, quality: int = 85) -> bytes:
    im = rgb.copy()
    im.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def media_type(data: bytes) -> str:
    for magic, kind in ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                        (b"RIFF", "image/webp"), (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    return "application/octet-stream"


class Preprocessor:
    """open_clip's eval transform of one model, split into `crop` (PIL -> uint8 HxWx3: resize and centre crop, done
    where images are decoded) and `normalize` (uint8 batch -> the model's float input, done by the encoder)."""

    def __init__(self, cfg: dict) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from torchvision.transforms import Compose

        steps = image_transform_v2(PreprocessCfg(**cfg), is_train=False).transforms
        cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
        self.geometry: Callable[[Image.Image], Image.Image] = Compose(steps[:cut])
        # the same resize and crop on a decoded tensor (a GPU's): torchvision's transforms take both
        self.tensor_geometry = Compose([t for t in steps[:cut] if type(t).__name__ in ("Resize", "CenterCrop")])
        size = cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # open_clip gives an int for ResNets
        self.mean = np.asarray(cfg["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(cfg["std"], np.float32).reshape(1, 3, 1, 1)

    def crop(self, rgb: Image.Image) -> np.ndarray:
        out = np.asarray(self.geometry(rgb).convert("RGB"), np.uint8)
        assert out.shape[:2] == self.size, (out.shape, self.size)
        return out

    def crop_tensor(self, rgb: torch.Tensor) -> torch.Tensor:
        """`crop` of a uint8 (3, H, W) tensor, on its device: (H, W, 3) uint8, as `crop` gives."""
        out = self.tensor_geometry(rgb).permute(1, 2, 0)
        assert tuple(out.shape[:2]) == self.size, (out.shape, self.size)
        return out

    def blank(self) -> np.ndarray:
        return np.zeros((*self.size, 3), np.uint8)

    def normalize(self, pixels: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 tensor on `device`, normalised as the model was trained. The
        uint8 batch travels, a quarter of the floats' bytes, and the device does the arithmetic: numpy took 0.3 s per
        256 crops on one core, which capped a GPU encoder near 550 images/s."""
        import torch

        x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels, np.uint8))
        x = x.to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        return x.sub_(torch.from_numpy(self.mean).to(device)).div_(torch.from_numpy(self.std).to(device))

    def __call__(self, images: Sequence[Image.Image]):
        return self.normalize(np.stack([self.crop(im) for im in images]))


def square_pixels(path: str | Path, size: int) -> np.ndarray:
    """A file as (size, size, 3) uint8, squashed to a square: the training input of the synthetic world."""
    return np.asarray(decode_file(path, size).rgb.resize((size, size), Image.BICUBIC))
