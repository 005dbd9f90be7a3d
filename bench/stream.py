"""A stream large enough to measure recall: a world of 100,000 test images indexed with the default ladder, and a
p = 0.1 stream over it that asks about hundreds of distinct images; every recall with its 95% interval over them.
Writes the `bicascade simulate` document. Not a test; about a quarter of an hour here.

    python bench/stream.py [--images 100000] [--queries 10000] [--root /tmp/bicascade-100k]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bicascade import query
from bicascade.pipelines.ingest import index
from bicascade.pipelines.lab import train, world
from bicascade.pipelines.measure import evaluate, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--root", default="/tmp/bicascade-100k")
    ap.add_argument("--out", default="bench/results/simulate_synthetic_100k.json")
    args = ap.parse_args()
    train.ensure_ladder(train.SYNTHETIC, with_world=False)
    root = Path(args.root)
    made = world.make_world(root / "world", world.WorldConfig(seed=21, train=0, val=0, test=args.images))
    db = str(root / "db")
    index.run_index(str(made / "test"), db, train.SYNTHETIC)
    ladder = query.registered(train.SYNTHETIC)
    corpus = simulate.load_corpus(db, ladder, evaluate.world_heldout(made, captions_per_image=1))
    report = simulate.run_stream(corpus, ladder, simulate.SimConfig(p=args.p, queries=args.queries))
    doc = report.to_json()
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(report.format())


if __name__ == "__main__":
    main()
