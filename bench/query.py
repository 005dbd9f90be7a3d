"""Query serving, measured in one run: warm-cache searches through `bicascade serve` over HTTP on 127.0.0.1 with 1
and 8 clients, full cascade vs level 0 alone, through Serve's proxy and with direct ingress (`serve --direct`),
beside the same queries through the in-process cascade; where the time goes per hop; cold queries (empty caches)
over HTTP and the cold-query cost of 3 vs 2 levels against Eq. 2. Prints JSON with the ratios. Not a test.

    python bench/query.py [--db work/db] [--queries 30] [--seconds 15] [--out bench/results/query_cpu.json]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Client, each_ingress, emit, load_test, pct

import bicascade
from bicascade import query
from bicascade.cascade import Cascade, DictCache, f_latency
from bicascade.pipelines.lab import world
from bicascade.pipelines.measure import evaluate
from bicascade.storage import tables


def in_process(db: str, queries: list[str], rounds: int) -> dict:
    """The same queries through the Python API in one thread: three text encodes per query included."""
    photos = bicascade.open(db)
    for q in queries:  # warm the caches
        photos.search(q, k=10)
    lat = []
    t0 = time.perf_counter()
    for _ in range(rounds):
        for q in queries:
            s = time.perf_counter()
            photos.search(q, k=10)
            lat.append((time.perf_counter() - s) * 1000)
    wall = time.perf_counter() - t0
    photos.close()
    return {"searches_per_s": round(len(lat) / wall, 1), **pct(lat)}


def breakdown(url: str, queries: list[str], rounds: int, depth: int | None = None) -> dict:
    """Where a warm search's time goes, one client: client total, the proxy (total - ingress), the ingress
    (ingress - router), and inside the router: query embeddings (cached by text), the cascade, the rest."""
    c = Client(url)
    rows = []
    for _ in range(rounds):
        for q in queries:
            total, doc, ingress = c.search({"query": q, "k": 10, "depth": depth})
            t = doc["stats"]["timing"]
            rows.append({"client_total": total, "proxy_and_http": total - ingress, "ingress": ingress - t["router_ms"],
                         "router_query_vectors": t["query_vectors_ms"], "router_cascade": t["cascade_ms"],
                         "router_other": t["router_ms"] - t["query_vectors_ms"] - t["cascade_ms"],
                         "level0": doc["stats"]["levels"][0]["ms"],
                         "levels_1_up": sum(lv["ms"] for lv in doc["stats"]["levels"][1:])})
    return {k: round(float(np.median([r[k] for r in rows])), 3) for k in rows[0]}


def cold_costs(db: str, queries: list[str]) -> dict:
    """Every query against empty caches: what an early query pays, 3-level (m = 50, 14) vs 2-level (m = 50)."""
    search = query.LocalSearch(db)
    lv = search.cascade.levels
    out = {}
    for name, levels, cutoffs in (("3-level", lv, [50, 14]), ("2-level", [lv[0], lv[-1]], [50])):
        gflops, ms = [], []
        for q in queries:
            for level in levels[1:]:
                level.cache = DictCache()
            res = Cascade(search.cascade.index, levels, cutoffs).search(q, k=10)
            gflops.append(res.gflops)
            ms.append(sum(s.ms for s in res.levels[1:]))
        out[name] = {"image_gflops_per_query": float(np.mean(gflops)), "rerank_ms": pct(ms)}
    flops = [out[n]["image_gflops_per_query"] for n in ("2-level", "3-level")]
    out["f_latency_measured_flops"] = flops[0] / flops[1]
    out["f_latency_measured_seconds"] = out["2-level"]["rerank_ms"]["p50_ms"] / out["3-level"]["rerank_ms"]["p50_ms"]
    out["f_latency_eq2"] = f_latency([info.gflops for info in search.ladder.levels], [50, 14])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="work/db", help="an indexed database of the synthetic world (`make demo`)")
    ap.add_argument("--queries", type=int, default=30, help="distinct queries, repeated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=15.0, help="duration of each load run")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    root = evaluate.world_of(tables.Database(args.db), None)
    _, caps = world.load_split(root, "test")
    rng = np.random.default_rng(0)
    queries = [caps[i][0] for i in rng.choice(len(caps), args.queries, replace=False)]
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-query-"))
    try:
        cold_db = str(tmp / "db")  # a copy whose caches we empty: the cold runs must not warm the user's database
        shutil.copytree(args.db, cold_db)
        ladder = query.recorded(tables.Database(cold_db))
        for info in ladder.levels[1:]:
            if tables.Database(cold_db).has(tables.emb_table(info.fingerprint)):
                tables.Database(cold_db).drop(tables.emb_table(info.fingerprint))
        cold = cold_costs(cold_db, queries[:10])
        local = in_process(cold_db, queries, args.rounds)
        runs, hops, cold_http = [], {}, None
        for ingress, url in each_ingress(cold_db):
            c = Client(url)
            if cold_http is None:
                fresh = [f"{q} (cold {i})" for i, q in enumerate(queries)]
                cold_http = [c.search({"query": q, "k": 10})[0] for q in fresh]  # new texts, partly cached images
            for q in queries:
                c.search({"query": q, "k": 10})  # every candidate of the measured queries now cached
            hops[ingress] = {"all": breakdown(url, queries, args.rounds),  # depth 1: what the extra levels add
                             "1": breakdown(url, queries, args.rounds, depth=1)}
            runs += [{"ingress": ingress, **load_test(url, queries, n, args.seconds, d)}
                     for n in (1, 8) for d in (None, 1)]
        by = {(r["ingress"], r["clients"], r["depth"]): r for r in runs}
        result = {
            "db": args.db, "ladder": ladder.name, "levels": ladder.names, "queries": len(queries),
            "in_process": local, "http": runs, "breakdown_ms_one_client": hops, "cold_http_new_texts": pct(cold_http),
            "ratios": {ingress: {"http_8_clients_over_in_process": round(by[(ingress, 8, "all")]["searches_per_s"] /
                                                                         local["searches_per_s"], 3),
                                 "depth3_over_depth1_p50_one_client": round(by[(ingress, 1, "all")]["p50_ms"] /
                                                                            by[(ingress, 1, 1)]["p50_ms"], 3)}
                       for ingress in hops},
            "cold_in_process": cold}
        emit(result, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
