"""GPU figures in one run (needs a CUDA GPU): indexing images/s per GPU with a ViT-B-16 image tower (random weights),
decoding on CPU workers, against a bare one-process loop; the phone and web corpora (bench/photos.py) indexed with
their JPEGs decoded on the GPU, with each stage's own rate on the card (GPU decode, crop, encode and the model's
FLOP rate against the card's bf16 peak: MFU) beside one CPU core's decode; then a ladder of real CLIP architectures
(ViT-B-32 -> ViT-B-16 -> ViT-L-14, random weights) indexed and served over HTTP on 127.0.0.1: cold and warm
text-query p50 per level (each level's own time inside the cascade) and per depth (the client's whole search).
Not a test. `--stages-only --device cpu` runs the stage table on the CPU (a check that the script works).

    python bench/gpu.py [--images 20000] [--phone 2000] [--web 100000] [--batch-size 256] [--out FILE]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from build import measure
from common import Client, emit, free_port, load_test, pct
from photos import corpus, web_folder

from bicascade import capacity, costs, images, ladders, models, query, registry
from bicascade.pipelines.ingest import index
from bicascade.pipelines.lab import world
from bicascade.serve import server
from bicascade.serve.app import AppConfig

INDEX_LADDER = ("gpu-vit-b-16", ["ViT-B-16"])
SERVE_LADDER = ("gpu-vit", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])


def ensure(name: str, archs: list[str]) -> query.ResolvedLadder:
    if name not in {ladder.name for ladder in registry.list_ladders()}:
        ladders.add(name, [ladders.parse_level(a, name, j) for j, a in enumerate(archs)])
    return query.registered(name)


def per_level(docs: list[dict]) -> list[dict]:
    """p50 of each level's own milliseconds inside the cascade, and how many images it encoded per query."""
    levels = [[d["stats"]["levels"][j] for d in docs] for j in range(len(docs[0]["stats"]["levels"]))]
    return [{"model": lv[0]["model"], "p50_ms": round(float(np.median([s["ms"] for s in lv])), 2),
             "encoded_per_query": round(float(np.mean([s["encoded"] for s in lv])), 1)} for lv in levels]


def served(db: str, root: Path, seconds: float) -> dict:
    _, caps = world.load_split(root, "test")
    picks = np.random.default_rng(0).choice(len(caps), 60, replace=False)
    cold_texts, warm_texts = [caps[i][1] for i in picks[:30]], [caps[i][0] for i in picks[30:]]
    url = server.start(AppConfig(db=db, rate=0), port=free_port())
    try:
        c = Client(url)
        cold = [c.search({"query": q, "k": 10}) for q in cold_texts]  # new texts, empty caches: levels >= 1 encode
        for q in warm_texts:
            c.search({"query": q, "k": 10})
        warm = [c.search({"query": q, "k": 10}) for q in warm_texts]
        runs = [load_test(url, warm_texts, n, seconds, d) for n in (1, 8) for d in (1, 2, None)]
    finally:
        server.stop()
    return {"cold": {"client": pct([m for m, _, _ in cold]), "levels": per_level([d for _, d, _ in cold])},
            "warm": {"client": pct([m for m, _, _ in warm]), "levels": per_level([d for _, d, _ in warm])},
            "load": runs}


def peak_tflops(card: str) -> float | None:
    return next((g.bf16_tflops for key, g in capacity.GPUS.items() if key.upper() in card.upper()), None)


def stages(paths: list[Path], spec: models.ModelSpec, device: str, batch: int) -> dict:
    """Each stage's own rate over one batch of the corpus, best of 3: the device's JPEG decode, its resize and crop,
    the encoder (and its MFU), and one CPU core's decode for comparison."""
    loaded = models.load_model(spec, device=device)
    datas = [p.read_bytes() for p in paths[:batch]]

    def rate(fn) -> float:
        best = float("inf")
        for _ in range(3):
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return round(len(datas) / best, 1)
    decoded = [t for t in images.decode_jpegs(datas, loaded.device) if t is not None]
    crops = torch.stack([loaded.preprocess.crop_tensor(t) for t in decoded])
    pixels = loaded.preprocess.normalize(crops, loaded.device)
    out = {"device_decode": rate(lambda: images.decode_jpegs(datas, loaded.device)),
           "device_crop": rate(lambda: [loaded.preprocess.crop_tensor(t) for t in decoded]),
           "encode": rate(lambda: loaded.encode_pixels(pixels))}
    t0 = time.perf_counter()
    for d in datas[:16]:
        images.decode(d)
    out["cpu_decode_one_core"] = round(len(datas[:16]) / (time.perf_counter() - t0), 1)
    gflops = costs.image_gflops(spec)
    peak = peak_tflops(torch.cuda.get_device_name(0)) if loaded.device.type == "cuda" else None
    out["encode_tflops"] = round(out["encode"] * gflops / 1e3, 2)
    out["mfu"] = round(out["encode_tflops"] / peak, 4) if peak else None
    return out


def corpus_run(kind: str, n: int, ladder: query.ResolvedLadder, batch: int, tmp: Path) -> dict:
    """The corpus written (distinct pictures, then byte-distinct copies up to n), its stages, and the index job."""
    root = tmp / kind
    t0 = time.perf_counter()
    # a 12 MP photo takes seconds to make: 40 distinct ones (HEIC and PNG among them)
    jpegs = corpus(kind, root, n, 40 if kind == "phone" else 1000)
    made = time.perf_counter() - t0
    spec = ladder.levels[0].spec
    report = index.run_index(str(root), str(tmp / f"db-{kind}"), ladder.name, index.IndexConfig(batch_size=batch))
    steady = (report.new_rows - batch) / max(1e-9, report.seconds - (report.startup_s or 0))
    return {"images": sum(1 for _ in root.iterdir()), "written_s": round(made, 1),
            "stages": stages(jpegs, spec, "cuda", batch),
            "job_images_per_s": report.images_per_s, "job_steady_images_per_s": round(steady, 1),
            "job_startup_s": report.startup_s, "errors": report.errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each load run")
    ap.add_argument("--phone", type=int, default=2000, help="phone photos (12 MP JPEGs) to index")
    ap.add_argument("--web", type=int, default=100000, help="web JPEGs (0.3 MP) to index")
    ap.add_argument("--stages-only", action="store_true", help="only the stage table, on --device")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.stages_only:
        with tempfile.TemporaryDirectory() as tmp:
            web_folder(Path(tmp), args.batch_size)
            spec = ensure(*INDEX_LADDER).levels[0].spec
            emit({"device": args.device, "stages": stages(sorted(Path(tmp).glob("*.jpg")), spec, args.device,
                                                          args.batch_size)}, args.out)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py measures a GPU: none is visible")
    card = torch.cuda.get_device_name(0)
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-gpu-"))
    try:
        b16 = ensure(*INDEX_LADDER)
        build = measure(args.images, b16.levels[0].spec, b16.name, args.batch_size, tmp)
        ladder = ensure(*SERVE_LADDER)
        source = tmp / f"world-{args.images}" / "test"  # the world measure() drew
        report = index.run_index(str(source), str(tmp / "db-vit"), ladder.name,
                                 index.IndexConfig(batch_size=args.batch_size))
        corpora = {kind: corpus_run(kind, n, b16, args.batch_size, tmp) for kind, n in (("web", args.web),
                                                                                        ("phone", args.phone))}
        result = {"card": card, "cpus": torch.get_num_threads(), "images": args.images, "batch_size": args.batch_size,
                  "index_vit_b_16": build, "corpora_vit_b_16": corpora,
                  "index_vit_b_32": {"images_per_s": report.images_per_s, "startup_s": report.startup_s,
                                     "seconds": report.seconds},
                  "serve": {"ladder": ladder.names, "gflops": [i.gflops for i in ladder.levels],
                            **served(str(tmp / "db-vit"), source.parent, args.seconds)}}
        emit(result, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
