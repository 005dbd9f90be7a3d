"""The one image path: every EXIF orientation of every format a camera or phone writes comes out upright, with the
upright width and height, and a broken file is a clear error."""
import io

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
