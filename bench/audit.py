"""The live recall audit against the offline truth, on one stream: a p-small-world stream of the world's held-out
captions through `bicascade serve` on 127.0.0.1, the router auditing a sampled fraction of it, then every served
result list checked offline against (a) the audit's own reference, the top level over audit_factor x m_1 level-0
candidates, and (b) the top level over the whole corpus. Prints JSON. Not a test.

    python bench/audit.py [--db work/db] [--queries 10000] [--fraction 0.05] [--out bench/results/audit_cpu.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from common import emit, free_port
from tqdm import tqdm

from bicascade import query
from bicascade.actors.router import RouterConfig
from bicascade.pipelines.measure import evaluate, simulate
from bicascade.serve import server
from bicascade.serve.app import AppConfig
from bicascade.storage import tables


def top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:k]


def kept(served: list[int], reference: np.ndarray, k: int) -> float:
    return len(set(served[:k]) & set(reference[:k].tolist())) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="work/db")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--fraction", type=float, default=0.05, help="share of queries the router audits")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k, factor = 10, RouterConfig.audit_factor
    db = tables.Database(args.db)
    ladder = query.open_ladder(db, None)
    corpus = simulate.load_corpus(args.db, ladder, evaluate.world_heldout(evaluate.world_of(db, None)))
    cfg = simulate.check(ladder, simulate.SimConfig(p=args.p, queries=args.queries, k=k))
    stream = simulate.make_stream(corpus, cfg)
    m1 = cfg.cutoffs[0]
    tmp = Path(tempfile.mkdtemp(prefix="bicascade-audit-"))
    try:
        copy = str(tmp / "db")
        shutil.copytree(args.db, copy)
        url = server.start(AppConfig(db=copy, rate=0, router={"audit_fraction": args.fraction}), port=free_port())
        try:
            session = requests.Session()
            session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=args.clients))

            def one(c: int) -> list[str]:
                r = session.post(f"{url}/search", json={"query": corpus.captions[c], "k": k}, timeout=120)
                r.raise_for_status()
                return [x["id"] for x in r.json()["results"]]
            with cf.ThreadPoolExecutor(args.clients) as pool:
                served = list(tqdm(pool.map(one, stream.caption), total=len(stream.caption), desc="stream",
                                   unit="q", mininterval=2))
            time.sleep(5)  # audits run off the request path: let the last ones finish
            audit = session.get(f"{url}/stats", timeout=60).json()["audit"]
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    row = {i: n for n, i in enumerate(corpus.ids)}
    last = len(corpus.names) - 1
    near, whole, served_hit, top_hit = [], [], [], []
    for c, truth, ids in zip(stream.caption, stream.truth, served):
        got = [row[i] for i in ids]
        top_scores = corpus.images[last] @ corpus.texts[last][c]
        candidates = top(corpus.images[0] @ corpus.texts[0][c], factor * m1)
        near.append(kept(got, candidates[top(top_scores[candidates], k)], k))
        best = top(top_scores, k)
        whole.append(kept(got, best, k))
        served_hit.append(truth in got)
        top_hit.append(truth in best.tolist())
    near, whole = np.array(near), np.array(whole)
    n = audit["queries"]
    result = {
        "db": args.db, "ladder": ladder.name, "images": corpus.n, "queries": len(served), "clients": args.clients,
        "distinct_targets": int(len(np.unique(stream.truth))), "p_measured": stream.coverage, "k": k,
        "cutoffs": list(cfg.cutoffs), "audit_factor": factor, "fraction": args.fraction,
        "audit": audit,
        # what the audit estimates, over every query of the stream, and the error a sample of its size would have
        "offline_kept_vs_audit_reference": float(near.mean()),
        "sampling_error_95": float(1.96 * near.std() / np.sqrt(n)) if n else None,
        "audit_minus_offline": audit["recall_kept"] - float(near.mean()) if n else None,
        # what the cutoffs cost against the top level ranking the whole corpus (which no server can afford)
        "offline_kept_vs_top_level_whole_corpus": float(whole.mean()),
        "recall_at_k_served": float(np.mean(served_hit)), "recall_at_k_top_level": float(np.mean(top_hit)),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
