"""Serving memory over a long stream: the RSS of every serving replica (the ingress with its router, the encoders)
and of the cache writers after 1,000 and after 50,000 queries of a p-small-world-like stream (the world's held-out
captions, topics re-asked, new captions keep missing the text cache), through `bicascade serve` on 127.0.0.1. Prints
JSON. Not a test.

    python bench/rss.py [--db work/db] [--queries 50000] [--clients 8] [--out bench/results/rss_cpu.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from common import emit, free_port

from bicascade import query
from bicascade.pipelines.lab import world
from bicascade.pipelines.measure import evaluate
from bicascade.serve import server
from bicascade.serve.app import AppConfig
from bicascade.storage import tables


def replicas() -> dict[str, list[float]]:
    """RSS in MiB of each Serve replica process of this machine and of each cache writer, by deployment."""
    out: dict[str, list[float]] = {}
    for p in psutil.process_iter(["cmdline"]):
        name = " ".join(p.info["cmdline"] or [])
        for dep in ("Api", "Encoder0", "Encoder1", "Encoder2", "CacheWriter"):
            if name.startswith(("ray::ServeReplica:bicascade:" + dep, "ray::" + dep)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    out.setdefault(dep, []).append(round(p.memory_info().rss / 2**20, 1))
    return {k: sorted(v) for k, v in sorted(out.items())}


def cache_tables(db: tables.Database, infos) -> dict[str, dict[str, int]]:
    """Each upper level's cache table: rows, fragments and versions (many small commits fragment a table)."""
    out = {}
    for info in infos[1:]:
        name = tables.emb_table(info.fingerprint)
        if db.has(name):
            ds = db.dataset(name)
            out[info.name] = {"rows": ds.count_rows(), "fragments": len(ds.get_fragments()),
                              "versions": len(ds.versions())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="work/db")
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = evaluate.world_of(tables.Database(args.db), None)
    _, caps = world.load_split(root, "test")
    rng = np.random.default_rng(0)
    # a stream over a tenth of the pool, Zipf-popular, each query one of its image's captions, numbered so that
    # later queries also bring new texts (the text cache is bounded too)
    pool = rng.choice(len(caps), len(caps) // 10, replace=False)
    weights = 1 / np.arange(1, len(pool) + 1)
    picks = rng.choice(pool, size=args.queries, p=weights / weights.sum())
    stream = [f"{caps[i][n % len(caps[i])]}" + (f" #{n % 5000}" if n % 3 == 0 else "") for n, i in enumerate(picks)]
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-rss-"))
    try:
        db = str(tmp / "db")
        shutil.copytree(args.db, db)
        reader = tables.Database(db)  # reads the latest version of every table it is asked about
        infos = query.open_ladder(reader, None).levels
        # one ingress replica: autoscaling would add processes mid-stream and blur what one of them holds
        url = server.start(AppConfig(db=db, rate=0, replicas={"Api": 1}), port=free_port())
        marks, done, t0 = {}, 0, time.monotonic()
        try:
            session = requests.Session()
            session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=args.clients))

            def one(q: str) -> int:
                return session.post(f"{url}/search", json={"query": q, "k": 10}, timeout=120).status_code
            with cf.ThreadPoolExecutor(args.clients) as pool_:
                for start in range(0, args.queries, 1000):
                    statuses = list(pool_.map(one, stream[start:start + 1000]))
                    done += len(statuses)
                    assert set(statuses) == {200}, statuses
                    if done in (1000, 5000, 10_000, 25_000, args.queries):
                        marks[done] = {"rss_mib": replicas(), "seconds": round(time.monotonic() - t0),
                                       "cache_tables": cache_tables(reader, infos)}
                        print(json.dumps({done: marks[done]}), flush=True)
        finally:
            server.stop()
        first, last = marks[1000]["rss_mib"], marks[args.queries]["rss_mib"]
        result = {"db": args.db, "queries": args.queries, "clients": args.clients, "marks": marks,
                  "growth_mib_1k_to_end": {k: round(sum(last[k]) - sum(first[k]), 1) for k in first if k in last}}
        emit(result, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
