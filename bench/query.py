"""Query serving: through one `bicascade serve` app over HTTP on 127.0.0.1, p50/p99 latency of warm-cache cascaded
queries vs level-0-only queries and queries/s at saturation; in process, the cold-query image-encoding cost and
latency of the 3-level vs the 2-level cascade against Eq. 2. Prints JSON with the ratios. Not a test.

    python bench/query.py [--ladder synthetic] [--queries 40] [--concurrency 8] [--seconds 20]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from bicascade import costs
from bicascade.actors import router
from bicascade.cascade import Cascade, DictCache
from bicascade.pipelines import index, train, world
from bicascade.serve import server
from bicascade.serve.app import AppConfig


def pct(xs: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(xs, 50)), 2), "p99_ms": round(float(np.percentile(xs, 99)), 2)}


def timed_post(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/search", json=body, timeout=120)
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def cold_costs(db: str, ladder: str, queries: list[str]) -> dict:
    """Every query against empty caches: what an early query pays, 3-level (m = 50, 14) vs 2-level (m = 50)."""
    cascade, _ = router.local_cascade(db, ladder, [50, 14])
    lv = cascade.levels
    out = {}
    for name, levels, cutoffs in (("3-level", lv, [50, 14]), ("2-level", [lv[0], lv[-1]], [50])):
        gflops, ms = [], []
        for q in queries:
            for level in levels[1:]:
                level.cache = DictCache()
            res = Cascade(cascade.index, levels, cutoffs).search(q, k=10)
            gflops.append(res.gflops)
            ms.append(sum(s.ms for s in res.levels[1:]))
        out[name] = {"image_gflops_per_query": float(np.mean(gflops)), "rerank_ms": pct(ms)}
    out["f_latency_measured_flops"] = out["2-level"]["image_gflops_per_query"] / out["3-level"]["image_gflops_per_query"]
    out["f_latency_measured_seconds"] = out["2-level"]["rerank_ms"]["p50_ms"] / out["3-level"]["rerank_ms"]["p50_ms"]
    out["f_latency_eq2"] = costs.f_latency([lv_.gflops for lv_ in lv], [50, 14])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ladder", default="synthetic")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5, help="warm passes over the queries")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of the saturation run")
    args = ap.parse_args()
    ladder, root = train.ensure_ladder(args.ladder)
    _, caps = world.load_split(root, "test")
    rng = np.random.default_rng(0)
    queries = [caps[i][0] for i in rng.choice(len(caps), args.queries, replace=False)]
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-query-"))
    try:
        db = str(tmp / "db")
        index.run_index(str(root / "test"), db, ladder.name)
        cold = cold_costs(db, ladder.name, queries[: max(5, args.queries // 4)])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = server.start(AppConfig(db=db, ladder=ladder.name), port=port)
        try:
            cold_http = [timed_post(url, {"query": q, "k": 10}) for q in queries]  # fills the caches
            warm = [timed_post(url, {"query": q, "k": 10}) for _ in range(args.rounds) for q in queries]
            level0 = [timed_post(url, {"query": q, "k": 10, "levels": 1}) for _ in range(args.rounds) for q in queries]
            done, errors, t_end = 0, 0, time.monotonic() + args.seconds

            def worker(i: int) -> tuple[int, int]:
                ok = bad = 0
                while time.monotonic() < t_end:
                    try:
                        timed_post(url, {"query": queries[(i + ok + bad) % len(queries)], "k": 10})
                        ok += 1
                    except requests.RequestException:
                        bad += 1
                return ok, bad

            t0 = time.monotonic()
            with cf.ThreadPoolExecutor(args.concurrency) as pool:
                for ok, bad in pool.map(worker, range(args.concurrency)):
                    done, errors = done + ok, errors + bad
            qps = done / (time.monotonic() - t0)
        finally:
            server.stop()
        result = {"ladder": ladder.name, "levels": list(ladder.levels), "queries": len(queries), "rounds": args.rounds,
                  "cold_cascade_http": pct(cold_http), "warm_cascade_http": pct(warm), "level0_only_http": pct(level0),
                  "warm_over_level0_p50": round(pct(warm)["p50_ms"] / pct(level0)["p50_ms"], 3),
                  "saturation": {"concurrency": args.concurrency, "seconds": args.seconds, "qps": round(qps, 1),
                                 "errors": errors},
                  "cold_in_process": cold}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
