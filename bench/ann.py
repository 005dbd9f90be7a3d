"""Level-0 ANN: write N x D unit vectors to LanceDB, build the index, and report recall@50 against exact search and
p50 search latency for a sweep of search parameters. Not a test.

Two worlds. `clustered`: tight clusters, queries drawn like the images. `clip` (default), shaped like CLIP's
embeddings: images in a cone (image-image cosine about 0.5) with no clusters inside it, and text queries from another
cone (the modality gap), each about one image, at a matched text-image cosine of about 0.37. A text query is far from
every image and its top 50 spread over more IVF partitions than an image's: the plan must hold for these.

    python bench/ann.py [--world clip] [--rows 1000000] [--dim 512] [--queries 100] [--index IVF_SQ]
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
from common import emit

from bicascade.storage import tables


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    noise = rng.normal(0, 1.0 / np.sqrt(dim), (n, dim)).astype(np.float32)
    return unit(centers[rng.integers(len(centers), size=n)] + noise * 0.8)


class ClipLike:
    """Images: sqrt(.5) * image axis + sqrt(.5) * meaning; texts: sqrt(.5) * text axis + sqrt(.5) * (0.74 * their
    image's meaning + noise). The axes are orthogonal to each other and to every meaning. Meanings are anisotropic
    Gaussians (variance falling as 1/rank, as in real embeddings) with no clusters; a text's noise is isotropic, so a
    query sits off the images' manifold and its top 50 are close calls spread over many partitions."""

    def __init__(self, rng: np.random.Generator, dim: int) -> None:
        axes = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T.astype(np.float32)
        self.rng, self.image_axis, self.text_axis = rng, axes[0], axes[1]
        self.scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)

    def meaning(self, x: np.ndarray) -> np.ndarray:
        x = x - np.outer(x @ self.image_axis, self.image_axis) - np.outer(x @ self.text_axis, self.text_axis)
        return unit(x)

    def images(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        meaning = self.meaning(self.rng.normal(size=(n, len(self.scale))).astype(np.float32) * self.scale)
        return unit(np.sqrt(0.5) * self.image_axis + np.sqrt(0.5) * meaning), meaning

    def texts(self, meanings: np.ndarray) -> np.ndarray:
        noise = self.meaning(self.rng.normal(size=meanings.shape))
        return unit(np.sqrt(0.5) * self.text_axis + np.sqrt(0.5) * unit(0.74 * meanings + np.sqrt(1 - 0.74**2) * noise))


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
    ap.add_argument("--index", default="IVF_SQ", help="comma list of index types to compare (IVF_FLAT, IVF_SQ, "
                    "IVF_HNSW_SQ)")
    ap.add_argument("--world", choices=["clip", "clustered"], default="clip")
    ap.add_argument("--probes", default="0.5,1,1.5", help="multiples of the plan's nprobes to sweep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    clip = ClipLike(rng, args.dim) if args.world == "clip" else None
    centers = unit(rng.normal(size=(1000, args.dim)))
    asked: list[np.ndarray] = []  # clip: the meanings of the images that queries are about
    tmp = tempfile.mkdtemp(prefix="bicascade-ann-")
    try:
        db = tables.Database(tmp)
        schema = tables.emb_schema(args.dim)
        table = db.table(tables.emb_table("bench"), schema)
        vectors = np.empty((args.rows, args.dim), np.float32)
        t0 = time.perf_counter()
        for start in range(0, args.rows, 100_000):
            size = min(100_000, args.rows - start)
            if clip is None:
                chunk = clustered(rng, size, args.dim, centers)
            else:
                chunk, meaning = clip.images(size)
                asked.append(meaning[rng.choice(size, max(1, args.queries * size // args.rows), replace=False)])
            vectors[start:start + len(chunk)] = chunk
            ids = pa.array([f"{i:08d}" for i in range(start, start + len(chunk))])
            vec = pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), args.dim)
            table.add(pa.Table.from_arrays([ids, vec], schema=schema))
        write_s = time.perf_counter() - t0
        queries = clustered(rng, args.queries, args.dim, centers) if clip is None else clip.texts(np.concatenate(asked))
        scores = queries @ vectors.T
        exact = np.argpartition(-scores, args.k, axis=1)[:, :args.k]
        truth = [{f"{i:08d}" for i in row} for row in exact]
        shape = {"image_image_cosine": float(np.mean(vectors[:2000] @ vectors[2000:4000].T)),
                 "query_top1_cosine": float(np.mean(scores.max(1))), "query_top50_cosine": float(np.mean(
                     np.take_along_axis(scores, exact, 1).min(1)))}
        del scores
        results = []
        for index_type in args.index.split(","):
            t0 = time.perf_counter()
            params = db.build_ann("bench", min_rows=0, index_type=index_type)
            build_s = time.perf_counter() - t0
            refines = [params.refine_factor, 2 * params.refine_factor] if params.refine_factor else [None]
            probes = [min(params.num_partitions, max(1, round(float(f) * params.nprobes)))
                      for f in args.probes.split(",")]
            sweep = [measure(db, queries, truth, args.k, replace(params, nprobes=n, refine_factor=r))
                     for n in probes for r in refines]
            results.append({"index": index_type, "partitions": params.num_partitions, "build_s": round(build_s, 1),
                            "default": asdict(params), "sweep": sweep})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        exact = measure(db, queries[:20], truth[:20], args.k, None)
        emit({"world": args.world, "rows": args.rows, "dim": args.dim, "k": args.k, "queries": len(queries),
              "shape": shape, "write_s": round(write_s, 1), "exact_p50_ms": exact["p50_ms"], "indexes": results},
             args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
