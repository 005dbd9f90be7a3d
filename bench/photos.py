"""Corpora shaped like what people index, made offline and deterministically from the sample photographs shipped in
scikit-image and matplotlib (crops, zoom, colour jitter and sensor-like noise, so every file has a photo's entropy
and no two are alike). Not a test.

    python bench/photos.py phone DIR [--n 600] [--seed 0]   # 12 MP JPEGs q90-95 with EXIF (orientation, time,
                                                            # camera, lens, GPS); every 10th HEIC, a few 16-bit PNGs
                                                            # and 24 MP panoramas
    python bench/photos.py web DIR [--n 20000] [--shard 1000]   # 0.3 MP JPEGs with captions in webdataset .tar shards
    python bench/photos.py library DIR [--n 180]   # camera-named JPEGs in folders named as a person names them

Prints what it wrote (files, bytes, seconds) as JSON.
"""
from __future__ import annotations

import argparse
import io
import tarfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pillow_heif
from common import emit
from PIL import Image

from bicascade.pipelines.lab.photos import oriented, sample_photos

pillow_heif.register_heif_opener()
CAMERAS = [("Apple", "iPhone 15 Pro", "iPhone 15 Pro back triple camera 6.86mm f/1.78"),
           ("samsung", "SM-S918B", None), ("Google", "Pixel 8", None),
           ("Canon", "EOS R6m2", "RF24-105mm F4 L IS USM"), ("FUJIFILM", "X100V", None)]
PLACES = [(48.8584, 2.2945), (51.5007, -0.1246), (40.6892, -74.0445), (-33.8568, 151.2153), (35.6586, 139.7454)]
SUBJECTS = {"astronaut": "an astronaut in a white suit", "coffee": "a cup of coffee on a saucer",
            "chelsea": "a tabby cat", "rocket": "a rocket on a launch pad", "grace_hopper": "a woman in uniform",
            "hubble_deep_field": "galaxies in the night sky", "immunohistochemistry": "a stained tissue sample",
            "retina": "a photograph of a retina", "camera": "a man with a camera"}
# a photo library's folders, named as people name them: some share a word with the subject's description, some not
FOLDERS = {"astronaut": "NASA astronaut portraits", "coffee": "coffee mornings", "chelsea": "our cat Chelsea",
           "rocket": "rocket launch 2023", "grace_hopper": "Grace Hopper archive", "hubble_deep_field": "Hubble",
           "immunohistochemistry": "lab slides", "retina": "eye exam retina scans", "camera": "photo club"}


def photo(base: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of `base` scaled to `size`, colour-jittered, with sensor-like noise."""
    w, h = base.size
    cw, ch = int(w * rng.uniform(0.55, 1.0)), int(h * rng.uniform(0.55, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = base.convert("RGB").crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
    arr = np.asarray(im, np.float32) * rng.uniform(0.85, 1.15, 3) + rng.uniform(-12, 12, 3)
    noise = rng.normal(0, rng.uniform(2, 6), (size[1] // 4 + 1, size[0] // 4 + 1, 3)).astype(np.float32)
    arr += np.repeat(np.repeat(noise, 4, 0), 4, 1)[:size[1], :size[0]]  # grain at a sensor's scale, cheaply
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def camera_exif(rng: np.random.Generator, n: int, orientation: int) -> Image.Exif:
    make, model, lens = CAMERAS[n % len(CAMERAS)]
    _, ex = oriented(Image.new("RGB", (1, 1)), orientation)
    ex[0x010F], ex[0x0110] = make, model
    sub = ex.get_ifd(0x8769)
    taken = datetime(2023, 1, 1) + timedelta(seconds=int(rng.integers(0, 2 * 365 * 86400)))
    sub[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")
    sub[0x9011] = f"{int(rng.integers(-8, 10)):+03d}:00"
    if lens:
        sub[0xA434] = lens
    if n % 4:  # a quarter without a position, as phones with location off write them
        lat, lon = PLACES[n % len(PLACES)]
        lat, lon = lat + rng.normal(0, 0.01), lon + rng.normal(0, 0.01)
        gps = ex.get_ifd(0x8825)
        gps[1], gps[3] = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
        gps[2], gps[4] = dms(abs(lat)), dms(abs(lon))
    return ex


def dms(value: float) -> tuple[float, float, float]:
    d = int(value)
    m = int((value - d) * 60)
    return float(d), float(m), round((value - d - m / 60) * 3600, 2)


def phone(root: Path, n: int, seed: int) -> dict:
    """`n` phone photos: 4032x3024 (12 MP) JPEGs at q90-95, EXIF-rotated as phones store portrait shots; every 10th
    a HEIC, every 50th a 16-bit PNG, every 100th a 24 MP panorama."""
    rng = np.random.default_rng(seed)
    bases = list(sample_photos().values())
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        size = (8192, 2930) if i % 100 == 99 else (4032, 3024)
        im = photo(bases[i % len(bases)], size, rng)
        orientation = (1, 1, 6, 8, 3)[i % 5]
        stored, _ = oriented(im, orientation)
        ex = camera_exif(rng, i, orientation)
        if i % 50 == 49:  # a 16-bit scan, no EXIF
            path = root / f"scan_{i:05d}.png"
            Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257).save(path)
        elif i % 10 == 9:
            path = root / f"IMG_{i:05d}.HEIC"
            stored.save(path, quality=80, exif=ex.tobytes())
        else:
            path = root / f"IMG_{i:05d}.JPG"
            stored.save(path, quality=int(rng.integers(90, 96)), exif=ex)
        out.append(path)
    return {"files": len(out), "bytes": sum(p.stat().st_size for p in out)}


def web(root: Path, n: int, seed: int, shard: int) -> dict:
    """`n` web images (640x480 or 480x640 JPEGs, q75-90) with captions, `shard` per webdataset .tar."""
    rng = np.random.default_rng(seed)
    names = list(SUBJECTS)
    bases = sample_photos()
    root.mkdir(parents=True, exist_ok=True)
    written = 0
    for s in range(0, n, shard):
        path = root / f"{s // shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + shard)):
                name = names[i % len(names)]
                size = (640, 480) if rng.random() < 0.7 else (480, 640)
                buf = io.BytesIO()
                photo(bases[name], size, rng).save(buf, "JPEG", quality=int(rng.integers(75, 91)))
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"{SUBJECTS[name]}, photo {i}".encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        written += path.stat().st_size
    return {"files": n, "shards": -(-n // shard), "bytes": written}


def library(root: Path, n: int, seed: int) -> dict:
    """`n` 1024x768 JPEGs named as cameras name them (IMG_0001.JPG), the sample photos' variants in `FOLDERS`."""
    rng = np.random.default_rng(seed)
    bases = sample_photos()
    out = []
    for i in range(n):
        name = list(FOLDERS)[i % len(FOLDERS)]
        path = root / FOLDERS[name] / f"IMG_{i:04d}.JPG"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(bases[name], (1024, 768), rng).save(path, quality=90)
        out.append(path)
    return {"files": len(out), "bytes": sum(p.stat().st_size for p in out)}


def distinct_copies(root: Path, n: int) -> list[Path]:
    """Bring a folder of JPEGs up to `n` files with byte-distinct copies (a JPEG comment after the start marker
    differs): the same pixels and decode cost, a content id of their own (the index keeps one row per content)."""
    files = sorted(root.glob("*.JPG")) + sorted(root.glob("*.jpg"))
    out = list(files)
    for k in range(n - len(files)):
        src = files[k % len(files)]
        data = src.read_bytes()
        note = f"copy {k}".encode()
        path = root / f"copy_{k:07d}.jpg"
        path.write_bytes(data[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + data[2:])
        out.append(path)
    return out


def web_folder(root: Path, distinct: int, seed: int = 0) -> None:
    """0.3 MP web JPEGs (640 x 480 or 480 x 640, q75-90) of the sample photos, as files."""
    rng = np.random.default_rng(seed)
    bases = list(sample_photos().values())
    root.mkdir(parents=True, exist_ok=True)
    for i in range(distinct):
        size = (640, 480) if rng.random() < 0.7 else (480, 640)
        photo(bases[i % len(bases)], size, rng).save(root / f"{i:06d}.jpg", quality=int(rng.integers(75, 91)))


def corpus(kind: str, root: Path, n: int, distinct: int) -> list[Path]:
    """`n` files of a corpus ("phone" or "web") in `root`: `distinct` pictures, then byte-distinct copies."""
    if kind == "phone":
        phone(root, min(n, distinct), seed=0)
    else:
        web_folder(root, min(n, distinct))
    return distinct_copies(root, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("phone", "web", "library"))
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=None, help="images (default: 600 phone, 20000 web, 180 library)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", type=int, default=1000, help="web: images per .tar shard")
    a = p.parse_args()
    t0 = time.perf_counter()
    if a.kind == "phone":
        doc = phone(Path(a.dir), a.n or 600, a.seed)
    elif a.kind == "library":
        doc = library(Path(a.dir), a.n or 180, a.seed)
    else:
        doc = web(Path(a.dir), a.n or 20_000, a.seed, a.shard)
    emit({"kind": a.kind, "dir": a.dir, **doc, "seconds": round(time.perf_counter() - t0, 1)}, None)


if __name__ == "__main__":
    main()
