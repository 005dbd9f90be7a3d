"""Build throughput: the Ray Data index job against a bare single-process decode + crop + encode loop over the same
files, with the same model, batch size and threads. Prints both rates and their ratio, end to end and after
start-up (the job's first seconds go to starting workers that import torch and load the model), for each size.
Not a test.

    python bench/build.py [--images 5000,100000] [--ladder synthetic] [--out bench/results/build_cpu.json]

A model as large as the ones people index with (`bicascade ladders add vit-b-32 ViT-B-32`: random weights):

    python bench/build.py --images 2000 --ladder vit-b-32 --out bench/results/build_vit-b-32_cpu.json
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit

from bicascade import images, models, query
from bicascade.pipelines.ingest import index
from bicascade.pipelines.lab import train, world


def bare_loop(paths: list[str], spec: models.ModelSpec, batch_size: int, threads: int) -> float:
    """Seconds to read, hash, decode, crop and encode every image in one process (the model load included)."""
    models.set_threads(threads)
    t0 = time.perf_counter()
    model = models.load_model(spec)
    for i in range(0, len(paths), batch_size):
        crops = []
        for p in paths[i:i + batch_size]:
            data = Path(p).read_bytes()
            images.content_id(data)
            crops.append(model.preprocess.crop(images.decode(data).rgb))
        model.encode_crops(np.stack(crops))
    return time.perf_counter() - t0


def measure(n: int, spec: models.ModelSpec, ladder: str, batch_size: int, tmp: Path) -> dict:
    cfg = world.WorldConfig(seed=7, train=0, val=0, test=n)
    root = world.make_world(tmp / f"world-{n}", cfg)
    paths = [str(p) for p in sorted((root / "test").iterdir())]
    bare = bare_loop(paths, spec, batch_size, torch.get_num_threads())
    report = index.run_index(str(root / "test"), str(tmp / f"db-{n}"), ladder, index.IndexConfig(batch_size=batch_size))
    bare_rate, job = len(paths) / bare, len(paths) / report.seconds
    steady = (len(paths) - batch_size) / (report.seconds - report.startup_s)  # after the first batch reached the writer
    return {"images": len(paths), "bare_images_per_s": round(bare_rate, 1), "job_images_per_s": round(job, 1),
            "ratio": round(job / bare_rate, 3), "job_startup_s": report.startup_s,
            "job_seconds": report.seconds, "job_steady_images_per_s": round(steady, 1),
            "steady_ratio": round(steady / bare_rate, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="5000,100000")
    ap.add_argument("--ladder", default=train.SYNTHETIC)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.ladder in train.PROFILES:  # one the project trains (cached afterwards)
        train.ensure_ladder(args.ladder, with_world=False)
    ladder = query.registered(args.ladder)  # else one of `bicascade ladders add`
    spec = ladder.levels[0].spec
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-build-"))
    try:
        runs = [measure(int(n), spec, ladder.name, args.batch_size, tmp) for n in args.images.split(",")]
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        result = {"device": device, "model": spec.name, "batch_size": args.batch_size,
                  "threads": torch.get_num_threads(), "runs": runs}
        emit(result, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
