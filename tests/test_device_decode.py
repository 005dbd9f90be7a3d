"""The GPU indexing path's choices, checked on the CPU (torchvision decodes JPEGs on either device through the same
call): which files the encoder decodes on its device and which the CPU decodes first, what a file the device
refuses becomes, and that both paths give the same pixels, stored copies and embeddings. The `gpu`-marked test runs
the same on a CUDA device."""
import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from bicascade import images, models
from bicascade.pipelines.ingest.index import EmbedBatches, decode_batch
from bicascade.pipelines.lab.photos import oriented, sample_photos

SPEC = models.ModelSpec("t/bc-tiny-vit-d2", "bc-tiny-vit-d2", seed=0)


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    photo = sample_photos()["chelsea"].convert("RGB")  # 451 x 300, a photograph's entropy
    rng = np.random.default_rng(0)
    big = np.asarray(photo.resize((2400, 1600), Image.BICUBIC), np.int16) + rng.integers(-20, 21, (1600, 2400, 3))
    stored, exif = oriented(photo, 6)  # a portrait shot as a phone stores it
    xyz = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    good = jpeg(photo, quality=92)
    return {
        "small.jpg": good,
        "rotated.jpg": jpeg(stored, quality=92, exif=exif),
        "large.jpg": jpeg(Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)), quality=95),  # > 1 MiB
        "grey.jpg": jpeg(photo.convert("L"), quality=92),
        "photo.png": (lambda b: (photo.save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "cmyk.jpg": jpeg(photo.convert("CMYK"), quality=92),
        "profiled.jpg": jpeg(photo, quality=92, icc_profile=xyz),  # not sRGB: the GPU would ignore it
        "truncated.jpg": good[:len(good) // 2],  # a header that opens, pixels that do not
    }


ON_DEVICE = {"small.jpg", "rotated.jpg", "large.jpg", "grey.jpg", "truncated.jpg"}


def batch(files: dict[str, bytes], device_jpegs: bool) -> dict:
    rows = {"uri": np.array(list(files), dtype=object), "bytes": np.array(list(files.values()), dtype=object)}
    cfg, _ = models.preprocessing(SPEC)
    return decode_batch(rows, cfg, known=set(), done=set(), device_jpegs=device_jpegs)


def test_which_files_the_device_decodes(files):
    assert len(files["large.jpg"]) > images.MAX_STORED_BYTES
    assert {name for name, data in files.items() if images.device_jpeg(data)} == ON_DEVICE
    head = images.device_jpeg(files["rotated.jpg"])
    assert (head.width, head.height) == (451, 300)  # upright (stored 300 x 451), from the header alone
    out = batch(files, device_jpegs=True)
    went = {u for u, j in zip(out["uri"], out["jpeg"]) if len(j)}
    assert went == ON_DEVICE
    by = dict(zip(out["uri"], range(len(out["uri"]))))
    assert bytes(out["bytes"][by["small.jpg"]]) == files["small.jpg"]  # small: stored as it came
    assert not len(out["bytes"][by["large.jpg"]])  # large: its stored copy is made on the device
    assert (out["width"][by["rotated.jpg"]], out["height"][by["rotated.jpg"]]) == (451, 300)
    assert not batch(files, device_jpegs=False)["jpeg"].astype(bool).any()  # CPU clusters decode everything


def test_both_paths_give_the_same_images_and_embeddings(files):
    """The device path (torchvision's decoder, resize and crop on tensors) against the CPU's (PIL): the same upright
    pixels within JPEG decoders' rounding, the same stored copies' shape, near-identical embeddings; the file the
    device refuses is decoded on the CPU and fails there with its reason, as it would have."""
    encoder = EmbedBatches(SPEC, threads=1)
    cpu, dev = (encoder(batch(files, device_jpegs=d)) for d in (False, True))
    for name in files:
        i = list(files).index(name)
        assert cpu["status"][i] == dev["status"][i], name
        if cpu["status"][i] == "error":
            assert name == "truncated.jpg" and dev["stage"][i] == "decode" and "cannot decode" in dev["error"][i]
            continue
        cos = float(np.dot(cpu["vector"][i], dev["vector"][i]))
        assert cos > 0.995, (name, cos)
        stored_cpu, stored_dev = (Image.open(io.BytesIO(bytes(b["bytes"][i]))) for b in (cpu, dev))
        assert stored_cpu.size == stored_dev.size, name
        if name == "large.jpg":
            assert max(stored_dev.size) == images.MAX_STORED_SIDE
            diff = np.abs(np.asarray(stored_cpu, np.int16) - np.asarray(stored_dev, np.int16)).mean()
            assert diff < 3, diff  # two resamplers and encoders, one picture


def test_a_batch_with_a_file_the_device_refuses_keeps_the_others(files):
    got = images.decode_jpegs([files["small.jpg"], files["truncated.jpg"], files["rotated.jpg"]], "cpu")
    assert got[1] is None and got[0].shape == got[2].shape == (3, 300, 451)  # the rotated one comes out upright


@pytest.mark.gpu
def test_the_device_path_on_a_gpu(files):
    """On a CUDA device: nvJPEG decodes, the rest as on the CPU; both paths encoded by the same GPU model agree."""
    encoder = EmbedBatches(SPEC, threads=1)
    assert encoder.model.device.type == "cuda"
    dev, ref = encoder(batch(files, device_jpegs=True)), encoder(batch(files, device_jpegs=False))
    ok = dev["status"] == "new"
    assert ok.sum() == len(files) - 1 and (ref["status"] == dev["status"]).all()
    sims = (dev["vector"][ok] * ref["vector"][ok]).sum(1)
    assert (sims > 0.99).all(), sims  # bf16 on the GPU
    assert images.decode_jpegs([files["small.jpg"]], "cuda")[0].device.type == "cuda"
