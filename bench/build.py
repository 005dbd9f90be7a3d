"""Build throughput: the Ray Data index job against a bare single-process decode + crop + encode loop over the same
files, with the same model, batch size and threads. Prints both rates and their ratio, end to end and after
start-up (the job's first seconds go to starting workers that import torch and load the model), for each size.
Not a test.

    python bench/build.py [--images 5000,100000] [--ladder synthetic] [--out bench/results/build_cpu.json]

A model as large as the ones people index with (`bicascade ladders add vit-b-32 ViT-B-32`: random weights):

    python bench/build.py --images 2000 --ladder vit-b-32 --out bench/results/build_vit-b-32_cpu.json

What people bring (bench/photos.py: 12 MP phone JPEGs with EXIF, a few HEIC, PNG and panoramas; 0.3 MP web JPEGs;
`--distinct` pictures, then byte-distinct copies): a per-stage table (one core, ms per image: read, hash, decode,
stored copy, crop, encode, write), the job against the minimal loop (each image decoded straight to the model's input
size, PIL's JPEG draft), and the peak RSS of all the job's processes:

    python bench/build.py --corpus phone --images 300 --distinct 40 --ladder vit-b-32
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from common import emit
from photos import corpus

from bicascade import images, models, query
from bicascade.pipelines.ingest import index
from bicascade.pipelines.lab import train, world
from bicascade.storage import tables


def bare_loop(paths: list[str], spec: models.ModelSpec, batch_size: int, threads: int, minimal: bool = False) -> float:
    """Seconds to read, hash, decode, crop and encode every image in one process (the model load included);
    `minimal`: no hash, each image decoded straight to the model's input size (the least a loop can do)."""
    models.set_threads(threads)
    t0 = time.perf_counter()
    model = models.load_model(spec)
    side = min(model.preprocess.size)
    for i in range(0, len(paths), batch_size):
        crops = []
        for p in paths[i:i + batch_size]:
            data = Path(p).read_bytes()
            if not minimal:
                images.content_id(data)
            crops.append(model.preprocess.crop(images.decode(data, min_side=side if minimal else images.DECODE_SIDE)
                                               .rgb))
        model.encode_crops(np.stack(crops))
    return time.perf_counter() - t0


def stage_table(paths: list[Path], spec: models.ModelSpec, batch_size: int, tmp: Path, sample: int = 24) -> dict:
    """Milliseconds per image of each stage of the job, on one core, over `sample` files of the corpus."""
    models.set_threads(1)
    model = models.load_model(spec)
    ms: dict[str, float] = dict.fromkeys(("read", "hash", "decode", "stored_copy", "crop", "encode", "write"), 0.0)
    rows, crops = [], []

    def timed(stage: str, fn):
        t = time.perf_counter()
        out = fn()
        ms[stage] += time.perf_counter() - t
        return out
    for p in paths[:sample]:
        data = timed("read", p.read_bytes)
        id_ = timed("hash", lambda d=data: images.content_id(d))
        decoded = timed("decode", lambda d=data: images.decode(d))
        stored = timed("stored_copy", lambda d=data, x=decoded: images.stored_bytes(d, x))
        crops.append(timed("crop", lambda x=decoded: model.preprocess.crop(x.rgb)))
        rows.append({"id": id_, "uri": str(p), "bytes": stored, "width": decoded.width, "height": decoded.height})
    t = time.perf_counter()
    for i in range(0, len(crops), batch_size):
        model.encode_crops(np.stack(crops[i:i + batch_size]))
    ms["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    tables.Database(str(tmp / "stage-db")).append(tables.IMAGES, tables.IMAGES_SCHEMA, rows)
    ms["write"] = time.perf_counter() - t
    n = len(rows)
    return {k: round(1000 * v / n, 2) for k, v in ms.items()} | {
        "stored_kb_per_image": round(sum(len(r["bytes"]) for r in rows) / n / 1024, 1)}


class PeakRss:
    """The largest sum of the RSS of this process, its children and every Ray process, sampled twice a second."""

    def __init__(self) -> None:
        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.5):
            procs = {me.pid: me, **{c.pid: c for c in me.children(recursive=True)}}
            for p in psutil.process_iter(["cmdline"]):
                if any("ray" in part for part in (p.info["cmdline"] or [])[:2]):
                    procs[p.pid] = p
            total = 0
            for p in procs.values():
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total / 2**30)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def measure_corpus(kind: str, n: int, distinct: int, spec: models.ModelSpec, ladder: str, batch_size: int,
                   tmp: Path) -> dict:
    paths = corpus(kind, tmp / kind, n, distinct)
    files = sorted((tmp / kind).iterdir())
    stages = stage_table(paths, spec, batch_size, tmp)
    threads = torch.get_num_threads()
    minimal = bare_loop([str(p) for p in files], spec, batch_size, threads, minimal=True)
    with PeakRss() as rss:
        report = index.run_index(str(tmp / kind), str(tmp / f"db-{kind}"), ladder,
                                 index.IndexConfig(batch_size=batch_size))
    job = len(files) / report.seconds
    steady = (len(files) - batch_size) / (report.seconds - report.startup_s)
    return {"corpus": kind, "images": len(files), "distinct": distinct, "stages_ms_per_image": stages,
            "minimal_loop_images_per_s": round(len(files) / minimal, 2), "job_images_per_s": round(job, 2),
            "ratio": round(job * minimal / len(files), 3), "job_startup_s": report.startup_s,
            "job_steady_images_per_s": round(steady, 2), "steady_ratio": round(steady * minimal / len(files), 3),
            "errors": report.errors, "peak_rss_gb": round(rss.peak, 2)}


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
    ap.add_argument("--corpus", choices=("world", "phone", "web"), default="world")
    ap.add_argument("--distinct", type=int, default=40, help="phone/web: distinct pictures among the images")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.ladder in train.PROFILES:  # one the project trains (cached afterwards)
        train.ensure_ladder(args.ladder, with_world=False)
    ladder = query.registered(args.ladder)  # else one of `bicascade ladders add`
    spec = ladder.levels[0].spec
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-build-"))
    try:
        runs = [measure(int(n), spec, ladder.name, args.batch_size, tmp) if args.corpus == "world" else
                measure_corpus(args.corpus, int(n), args.distinct, spec, ladder.name, args.batch_size, tmp)
                for n in args.images.split(",")]
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        result = {"device": device, "model": spec.name, "batch_size": args.batch_size,
                  "threads": torch.get_num_threads(), "runs": runs}
        emit(result, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
