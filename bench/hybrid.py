"""Keyword, semantic and hybrid search, measured in one run in process (`bicascade.open`), every query's embeddings
cached first (warm), the modes' order rotating per query. Not a test. Two corpora:

- world: the synthetic world's test split, indexed as a user with captions would (a parquet of paths and one caption
  per image); each image's other two captions are the queries, so keyword search never sees the query's own words
  verbatim. A hit is the image itself.
- photos: the sample photographs' variants as a photo library holds them (bench/photos.py library: IMG_0001.JPG in
  folders named as people name them, no captions), queried with a description of each subject; the file names and
  folders are all keyword search has. A hit is any photo of the subject. The ladder's models were trained on the
  synthetic world (no pretrained weights offline), so semantic search here is near chance: what this shows is what
  the keyword side adds to it.

Prints Recall@1/10 (photos: also precision@10) and the p50/p99 latency of each mode.

    python bench/hybrid.py [--corpus world|photos] [--world work/world] [--queries 600] [--out FILE]
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
from photos import FOLDERS, SUBJECTS, library

import bicascade
from bicascade.protocol import MODES

Queries = list[tuple[str, set[str]]]  # text, the uris that answer it


def world_corpus(world: Path, tmp: Path, n: int) -> tuple[Path, Queries]:
    captions = pq.read_table(world / "captions.parquet")
    test = captions.filter(pc.equal(captions["split"], "test")).to_pylist()
    by_uri: dict[str, list[str]] = {}
    for row in test:
        by_uri.setdefault(row["uri"], []).append(row["caption"])
    uris = sorted(by_uri)
    source = tmp / "captioned.parquet"
    pq.write_table(pa.table({"uri": [str(world / u) for u in uris], "caption": [by_uri[u][0] for u in uris]}), source)
    picked = np.random.default_rng(0).choice(len(uris), size=min(n, len(uris)), replace=False)
    return source, [(by_uri[uris[i]][1 + k % 2], {str(world / uris[i])}) for k, i in enumerate(picked)]


def photos_corpus(tmp: Path, n: int) -> tuple[Path, Queries]:
    source = tmp / "library"
    library(source, n, seed=0)
    return source, [(SUBJECTS[name], {str(p) for p in (source / folder).iterdir()}) for name, folder in FOLDERS.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=("world", "photos"), default="world")
    p.add_argument("--world", default="work/world", help="a world (`make demo` makes work/world)")
    p.add_argument("--ladder", default="synthetic")
    p.add_argument("--queries", type=int, default=600, help="world: queries asked")
    p.add_argument("--photos", type=int, default=180, help="photos: the library's size")
    p.add_argument("--out")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, queries = (world_corpus(Path(a.world).resolve(), tmp, a.queries) if a.corpus == "world"
                           else photos_corpus(tmp, a.photos))
        db = bicascade.open(tmp / "db")
        t0 = time.perf_counter()
        added = db.add(source, ladder=a.ladder)
        index_s = time.perf_counter() - t0
        for text, _ in queries:  # warm: every query's cascade embeddings cached, so no mode pays another's misses
            db.search(text, k=10)
        ranks: dict[str, list[int]] = {m: [] for m in MODES}
        precision: dict[str, list[float]] = {m: [] for m in MODES}
        ms: dict[str, list[float]] = {m: [] for m in MODES}
        for n, (text, truth) in enumerate(queries):
            for mode in MODES[n % 3:] + MODES[:n % 3]:  # the order rotates: no mode always runs first
                t = time.perf_counter()
                got = [h.uri for h in db.search(text, k=10, mode=mode)]
                ms[mode].append((time.perf_counter() - t) * 1000)
                ranks[mode].append(next((r for r, uri in enumerate(got) if uri in truth), 10))
                precision[mode].append(sum(uri in truth for uri in got) / 10)
        out = {}
        for mode in MODES:
            r = np.array(ranks[mode])
            out[mode] = {"recall": {"1": round(float((r < 1).mean()), 4), "10": round(float((r < 10).mean()), 4)},
                         **({"precision_at_10": round(float(np.mean(precision[mode])), 4)}
                            if a.corpus == "photos" else {}), **pct(ms[mode])}
        db.close()
    sem, hyb = out["semantic"], out["hybrid"]
    emit({"corpus": a.corpus, "ladder": a.ladder, "images": added.rows, "queries": len(queries),
          "index_s": round(index_s, 1), "indexed": added.new_rows, "modes": out,
          "hybrid_minus_semantic": {k: round(hyb["recall"][k] - sem["recall"][k], 4) for k in ("1", "10")},
          "hybrid_p50_over_semantic": round(hyb["p50_ms"] / sem["p50_ms"], 2)}, a.out)


if __name__ == "__main__":
    main()
