"""The one image path: every EXIF orientation of every format a camera or phone writes comes out upright, with the
upright width and height, and what it says about its capture; a broken file is a clear error, a broken EXIF block a
warning."""
import io
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from bicascade import images
from bicascade.errors import BadInputError
from bicascade.pipelines.lab.photos import oriented


def picture() -> Image.Image:
    y, x = np.mgrid[0:40, 0:60]
    return Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8))  # landscape, no symmetry


def saved(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "JPEG"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_every_orientation_comes_out_upright(fmt, orientation):
    up = picture()
    stored, exif = oriented(up, orientation)
    lossless = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}.get(fmt, {})
    got = images.decode(saved(stored, fmt, exif=exif, **lossless))
    assert (got.width, got.height) == up.size == got.rgb.size  # TIFF carries its orientation tag only once loaded
    tolerance = 12 if fmt == "JPEG" else 0
    assert np.abs(np.asarray(got.rgb, int) - np.asarray(up, int)).mean() <= tolerance


def camera_exif(orientation: int = 1, taken: str | None = "2024:12:24 18:30:00", offset: str | None = "+01:00",
                make: str = "Canon", model: str = "EOS R5", lens: str = "RF24-105mm F4 L IS USM",
                gps: tuple | None = ("N", (48.0, 51.0, 30.24), "E", (2.0, 17.0, 40.2))) -> Image.Exif:
    """The EXIF a phone or camera writes: orientation, capture time and offset, make, model, lens, GPS."""
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0112] = make, model, orientation
    sub = ex.get_ifd(0x8769)
    if taken:
        sub[0x9003] = taken
    if offset:
        sub[0x9011] = offset
    sub[0xA434] = lens
    if gps:
        g = ex.get_ifd(0x8825)
        g[1], g[2], g[3], g[4] = gps
    return ex


EIFFEL = (48.8584, 2.2945)


@pytest.mark.parametrize("fmt, media", [("JPEG", "image/jpeg"), ("HEIF", "image/heic"), ("PNG", "image/png"),
                                        ("WEBP", "image/webp")])
@pytest.mark.parametrize("orientation", [1, 6])
def test_capture_metadata_is_read_from_every_format(fmt, media, orientation):
    got = images.decode(saved(picture(), fmt, exif=camera_exif(orientation)))
    c = got.capture
    assert (c.media_type, c.taken, c.taken_offset) == (media, datetime(2024, 12, 24, 18, 30), 60)
    assert (c.camera_make, c.camera_model, c.lens) == ("Canon", "EOS R5", "RF24-105mm F4 L IS USM")
    assert (c.lat, c.lon) == pytest.approx(EIFFEL, abs=1e-4) and c.warning is None


def test_capture_metadata_edge_cases():
    tiff = images.decode(saved(picture(), "TIFF", exif=camera_exif())).capture  # Pillow writes TIFF's IFD0 only
    assert (tiff.media_type, tiff.camera_make, tiff.camera_model) == ("image/tiff", "Canon", "EOS R5")
    bare = images.decode(saved(picture(), "JPEG")).capture
    assert bare.media_type == "image/jpeg" and bare.taken is bare.camera_model is bare.lat is bare.warning is None
    west = images.decode(saved(picture(), "JPEG", exif=camera_exif(
        offset="-07:00", gps=("S", (33.0, 51.0, 24.0), "W", (151.0, 12.0, 55.0))))).capture
    assert west.taken_offset == -420 and (west.lat, west.lon) == pytest.approx((-33.8567, -151.2153), abs=1e-4)
    unset = images.decode(saved(picture(), "JPEG", exif=camera_exif(taken="0000:00:00 00:00:00", offset=None,
                                                                     gps=None))).capture
    assert unset.taken is unset.taken_offset is unset.lat is None and unset.warning is None  # zeros: never set
    odd = images.decode(saved(picture(), "JPEG", exif=camera_exif(taken="yesterday", offset="+99:00",
                                                                   gps=("N", (91.0, 0.0, 0.0), "E", (2.0, 0.0, 0.0)))))
    c = odd.capture  # fields that parse to nonsense are skipped, said, and the rest is kept
    assert c.taken is c.taken_offset is c.lat is c.lon is None and c.camera_model == "EOS R5"
    assert "capture time" in c.warning and "UTC offset" in c.warning and "GPS latitude" in c.warning


def test_a_broken_exif_block_is_a_warning_and_the_picture_still_decodes():
    good = saved(picture(), "JPEG", quality=95, exif=camera_exif(orientation=6))
    at = good.find(b"Exif\x00\x00")
    broken = bytearray(good)
    broken[at + 20:at + 60] = b"\xff" * 40  # IFD0's entries: counts and offsets past the block's end
    got = images.decode(bytes(broken))
    assert got.capture.warning and got.capture.warning.startswith("malformed EXIF")
    assert got.rgb.size == (60, 40) and got.capture.media_type == "image/jpeg"  # orientation lost: as stored


def test_heic_decodes():
    got = images.decode(saved(picture(), "HEIF", quality=95))
    assert (got.width, got.height) == (60, 40) and got.rgb.mode == "RGB"


def test_a_truncated_file_is_a_clear_error():
    data = saved(picture(), "JPEG", quality=90)
    with pytest.raises(BadInputError, match="cannot decode|not an image"):
        images.decode(data[: len(data) // 2])


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_crop_then_normalize_is_open_clips_eval_transform(arch):
    """Decode workers crop, the encoder normalises (on its own device): together exactly open_clip's transform."""
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from bicascade import models

    cfg, _ = models.preprocessing(models.ModelSpec(f"t/{arch}", arch))
    prep = images.Preprocessor(cfg)
    pics = [picture(), picture().rotate(90, expand=True)]
    got = prep.normalize(np.stack([prep.crop(p) for p in pics]), torch.device("cpu"))
    want = torch.stack([image_transform_v2(PreprocessCfg(**cfg), is_train=False)(p) for p in pics])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
