"""Real photographs written the way cameras and phones write them: the sample photos shipped inside scikit-image and
matplotlib, re-saved as JPEG (baseline and progressive), PNG, WebP, TIFF and HEIC, with EXIF orientations 1/3/6/8,
a phone's upper-case `.JPG` with its `.AAE` sidecar, a CMYK, a grayscale and a very large copy. For trying bicascade
without one's own photos, and for the tests.

    python -m bicascade.pipelines.lab.photos DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from bicascade import images
from bicascade.errors import BadInputError

# how each EXIF orientation stores an upright image: the inverse of what a viewer applies
STORED = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def sample_photos() -> dict[str, Image.Image]:
    """The colour photographs shipped with scikit-image and matplotlib (no download), as RGB images."""
    try:
        import skimage.data as data
    except ImportError:
        raise BadInputError("sample photos need scikit-image: pip install scikit-image") from None
    import matplotlib.cbook

    out = {name: Image.fromarray(getattr(data, name)()) for name in
           ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")}
    out["grace_hopper"] = images.decode_file(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).rgb
    out["camera"] = Image.fromarray(data.camera())  # a grayscale photo
    return {k: v.convert("RGB") if k != "camera" else v for k, v in out.items()}


def oriented(im: Image.Image, orientation: int) -> tuple[Image.Image, Image.Exif]:
    """The stored pixels and the EXIF block of an upright image saved with `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return (im.transpose(STORED[orientation]) if STORED[orientation] is not None else im), exif


def write(root: str | Path, large_side: int = 5000) -> dict[str, list[Path]]:
    """Write the sample photos under `root`; returns {photo: [its files]}, where the files of one photo are the same
    picture (rotated copies losslessly, so an upright decoder gives identical pixels)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    files: dict[str, list[Path]] = {}
    coffee = photos.pop("coffee")  # landscape, so a sideways copy swaps width and height
    files["coffee"] = []
    for orientation in STORED:  # lossless formats: every copy decodes to the same upright pixels
        stored, exif = oriented(coffee, orientation)
        for ext, kw in (("png", {}), ("webp", {"lossless": True})) + ((("tiff", {}),) if orientation in (1, 6) else ()):
            path = root / f"coffee-exif{orientation}.{ext}"
            stored.save(path, exif=exif, **kw)
            files["coffee"].append(path)
    for name, im in photos.items():
        path = root / f"{name}.jpg"
        im.save(path, quality=90, progressive=name == "astronaut")
        files[name] = [path]
    stored, exif = oriented(photos["chelsea"], 6)  # a phone photo: JPEG stored sideways, EXIF says so
    stored.save(root / "chelsea-phone.JPG", quality=92, exif=exif)
    files["chelsea"].append(root / "chelsea-phone.JPG")
    (root / "chelsea-phone.AAE").write_text("<?xml version='1.0'?><plist/>")  # a phone's edit sidecar: no image
    photos["retina"].save(root / "retina.heic", quality=90)  # what iPhones write (rotation lives in the container)
    files["retina"].append(root / "retina.heic")
    photos["rocket"].convert("CMYK").save(root / "rocket-cmyk.jpg", quality=92)
    files["rocket"].append(root / "rocket-cmyk.jpg")
    big = photos["hubble_deep_field"].resize((large_side, int(large_side * 0.872)), Image.BICUBIC)
    big.save(root / "hubble-large.jpg", quality=85)
    files["hubble_deep_field"].append(root / "hubble-large.jpg")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="folder to write the photos to")
    args = ap.parse_args()
    files = write(args.root)
    print(f"{sum(len(v) for v in files.values())} files of {len(files)} photos in {args.root}")


if __name__ == "__main__":
    main()
