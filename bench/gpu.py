"""GPU figures in one run (needs a CUDA GPU): indexing images/s per GPU with a ViT-B-16 image tower (random weights),
decoding on CPU workers, against a bare one-process loop; then a ladder of real CLIP architectures (ViT-B-32 ->
ViT-B-16 -> ViT-L-14, random weights) indexed and served over HTTP on 127.0.0.1: cold and warm text-query p50 per
level (each level's own time inside the cascade) and per depth (the client's whole search). Not a test.

    python bench/gpu.py [--images 20000] [--batch-size 256] [--out bench/results/gpu.json]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from build import measure
from common import Client, emit, free_port, load_test, pct

from bicascade import ladders, query, registry
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each load run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
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
        result = {"card": card, "cpus": torch.get_num_threads(), "images": args.images, "batch_size": args.batch_size,
                  "index_vit_b_16": build,
                  "index_vit_b_32": {"images_per_s": report.images_per_s, "startup_s": report.startup_s,
                                     "seconds": report.seconds},
                  "serve": {"ladder": ladder.names, "gflops": [i.gflops for i in ladder.levels],
                            **served(str(tmp / "db-vit"), source.parent, args.seconds)}}
        emit(result, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
