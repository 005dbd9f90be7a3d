"""Level-0 ANN: write N x D clustered unit vectors to LanceDB, build the index, and report recall@50 against
exact search and p50 search latency for a sweep of search parameters. Not a test.

    python bench/ann.py [--rows 1000000] [--dim 512] [--queries 100] [--index IVF_FLAT,IVF_SQ,IVF_HNSW_SQ]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa

from bicascade.storage import tables


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    noise = rng.normal(0, 1.0 / np.sqrt(dim), (n, dim)).astype(np.float32)
    x = centers[rng.integers(len(centers), size=n)] + noise * 0.8
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(db: tables.Database, queries: np.ndarray, truth: list[set[str]], k: int,
            params: tables.AnnParams | None) -> dict:
    lat, hits = [], []
    for q, t in zip(queries, truth):
        s = time.perf_counter()
        ids, _ = db.search("bench", q, k, params)
        lat.append(time.perf_counter() - s)
        hits.append(len(t & set(ids)) / k)
    knobs = {"nprobes": params.nprobes, "ef": params.ef, "refine_factor": params.refine_factor} if params else {}
    return {**knobs, f"recall_at_{k}": round(float(np.mean(hits)), 4), "p50_ms": round(1000 * float(np.median(lat)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--index", default="IVF_FLAT,IVF_SQ,IVF_HNSW_SQ", help="comma list of index types to compare")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, args.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    tmp = tempfile.mkdtemp(prefix="bicascade-ann-")
    try:
        db = tables.Database(tmp)
        schema = tables.emb_schema(args.dim)
        table = db.table(tables.emb_table("bench"), schema)
        vectors = np.empty((args.rows, args.dim), np.float32)
        t0 = time.perf_counter()
        for start in range(0, args.rows, 100_000):
            chunk = clustered(rng, min(100_000, args.rows - start), args.dim, centers)
            vectors[start:start + len(chunk)] = chunk
            ids = pa.array([f"{i:08d}" for i in range(start, start + len(chunk))])
            vec = pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), args.dim)
            table.add(pa.Table.from_arrays([ids, vec], schema=schema))
        write_s = time.perf_counter() - t0
        queries = clustered(rng, args.queries, args.dim, centers)
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :args.k]
        truth = [{f"{i:08d}" for i in row} for row in exact]
        results = []
        for index_type in args.index.split(","):
            t0 = time.perf_counter()
            params = db.build_ann("bench", min_rows=0, index_type=index_type)
            build_s = time.perf_counter() - t0
            refines = [params.refine_factor, 2 * params.refine_factor] if params.refine_factor else [None]
            sweep = [measure(db, queries, truth, args.k, replace(params, nprobes=n, refine_factor=r))
                     for n in (params.nprobes // 2, params.nprobes, 2 * params.nprobes) for r in refines]
            results.append({"index": index_type, "partitions": params.num_partitions, "build_s": round(build_s, 1),
                            "default": asdict(params), "sweep": sweep})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        exact = measure(db, queries[:20], truth[:20], args.k, None)
        print(json.dumps({"rows": args.rows, "dim": args.dim, "k": args.k, "write_s": round(write_s, 1),
                          "exact_p50_ms": exact["p50_ms"], "indexes": results}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
