"""Keyword, semantic and hybrid search on the synthetic world's test split, indexed as a user with captions would
(a parquet of paths and one caption per image): each image's other two captions are the queries, so keyword search
never sees the query's own words verbatim. Prints Recall@1/10 and the p50/p99 latency of each mode, measured in one
run in process (`bicascade.open`), every query's embeddings cached first (warm), the modes' order rotating per
query. Not a test.

    python bench/hybrid.py [--world work/world] [--queries 600] [--out bench/results/hybrid_synthetic.json]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import emit, pct

import bicascade
from bicascade.protocol import MODES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="work/world", help="a world (`make demo` makes work/world)")
    p.add_argument("--ladder", default="synthetic")
    p.add_argument("--queries", type=int, default=600)
    p.add_argument("--out")
    a = p.parse_args()
    world = Path(a.world).resolve()
    captions = pq.read_table(world / "captions.parquet")
    test = captions.filter(pc.equal(captions["split"], "test")).to_pylist()
    by_uri: dict[str, list[str]] = {}
    for row in test:
        by_uri.setdefault(row["uri"], []).append(row["caption"])
    uris = sorted(by_uri)
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table({"uri": [str(world / u) for u in uris], "caption": [by_uri[u][0] for u in uris]}),
                       Path(tmp) / "captioned.parquet")
        photos = bicascade.open(Path(tmp) / "db")
        t0 = time.perf_counter()
        added = photos.add(Path(tmp) / "captioned.parquet", ladder=a.ladder)
        index_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        picked = rng.choice(len(uris), size=min(a.queries, len(uris)), replace=False)
        queries = [(by_uri[uris[i]][1 + n % 2], str(world / uris[i])) for n, i in enumerate(picked)]
        for text, _ in queries:  # warm: every query's cascade embeddings cached, so no mode pays another's misses
            photos.search(text, k=10)
        ranks: dict[str, list[int]] = {m: [] for m in MODES}
        ms: dict[str, list[float]] = {m: [] for m in MODES}
        for n, (text, truth) in enumerate(queries):
            for mode in MODES[n % 3:] + MODES[:n % 3]:  # the order rotates: no mode always runs first
                t = time.perf_counter()
                got = [h.uri for h in photos.search(text, k=10, mode=mode)]
                ms[mode].append((time.perf_counter() - t) * 1000)
                ranks[mode].append(got.index(truth) if truth in got else 10)
        out = {}
        for mode in MODES:
            r = np.array(ranks[mode])
            out[mode] = {"recall": {"1": round(float((r < 1).mean()), 4), "10": round(float((r < 10).mean()), 4)},
                         **pct(ms[mode])}
        photos.close()
    sem, hyb = out["semantic"], out["hybrid"]
    emit({"world": str(world), "ladder": a.ladder, "images": len(uris), "queries": len(queries),
          "index_s": round(index_s, 1), "indexed": added.new_rows, "modes": out,
          "hybrid_minus_semantic": {k: round(hyb["recall"][k] - sem["recall"][k], 4) for k in ("1", "10")},
          "hybrid_p50_over_semantic": round(hyb["p50_ms"] / sem["p50_ms"], 2)}, a.out)


if __name__ == "__main__":
    main()
