"""Build throughput: the full Ray Data index job vs a bare single-process decode+encode loop, same model, batch
size and threads, on a generated corpus. Prints both and their ratio, end to end and after start-up (the job's
first seconds go to starting worker processes that import torch and load the model). Not a test.

    python bench/build.py [--images 3000] [--ladder synthetic] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bicascade import images, models
from bicascade.pipelines import index, train, world


def bare_loop(paths: list[str], spec: models.ModelSpec, batch_size: int, threads: int) -> float:
    """Seconds to read, decode, preprocess and encode every image in one process."""
    models.set_threads(threads)
    t0 = time.perf_counter()
    model = models.load_model(spec)
    for i in range(0, len(paths), batch_size):
        pixels = []
        for p in paths[i:i + batch_size]:
            data = Path(p).read_bytes()
            images.content_id(data)
            pixels.append(model.preprocess(images.to_rgb(images.decode(data))))
        model.encode_pixels(torch.stack(pixels))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--ladder", default="synthetic")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    ladder, _ = train.ensure_ladder(args.ladder, with_world=False)
    spec = models.get_model(ladder.levels[0])
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-bench-"))
    try:
        cfg = replace(world.WorldConfig(seed=7), train=0, val=0, test=args.images)
        root = world.make_world(tmp / "world", cfg)
        paths = [str(p) for p in sorted((root / "test").iterdir())]
        bare = bare_loop(paths, spec, args.batch_size, torch.get_num_threads())
        doc = index.run_index(str(root / "test"), str(tmp / "db"), args.ladder, index.IndexConfig(batch_size=args.batch_size))
        bare_rate, job = len(paths) / bare, len(paths) / doc["seconds"]
        # rate after the first encoded batch reached the writer (that batch excluded)
        steady = (len(paths) - args.batch_size) / (doc["seconds"] - doc["startup_s"])
        result = {"images": len(paths), "model": spec.name, "batch_size": args.batch_size,
                  "threads": torch.get_num_threads(), "bare_images_per_s": round(bare_rate, 1),
                  "ray_job_images_per_s": round(job, 1), "ratio": round(job / bare_rate, 3),
                  "ray_job_startup_s": doc["startup_s"], "ray_job_steady_images_per_s": round(steady, 1),
                  "steady_ratio": round(steady / bare_rate, 3)}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
