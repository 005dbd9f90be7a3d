"""A million images on this machine, as a user would run it: generate them (the world generator drawn without
supersampling, at 64 px), `bicascade index` them with the default ladder while sampling images/s and the RSS of
the driver and the Ray workers, SIGKILL the job half way and resume it, then measure level 0's ANN against exact
search on real text queries (the world's captions through level 0's text tower), and serve it over HTTP: cold
searches (new texts, empty caches), then warm searches/s and p50 with 1 and 8 clients. Writes JSON and a plot. Not
a test; about an hour and a half here.

    python bench/million.py [--images 1000000] [--root /tmp/bicascade-1m] [--out bench/results/million_cpu.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
from common import Client, each_ingress, load_test, pct

from bicascade import models, query
from bicascade.pipelines.lab import train, world
from bicascade.storage import tables


def tree_rss(pid: int) -> tuple[float, float, int]:
    """(driver MiB, Ray workers MiB summed, workers) of a process tree."""
    try:
        root = psutil.Process(pid)
        kids = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0.0, 0
    workers = [p for p in kids if p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline()[:3])]
    total = 0.0
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return root.memory_info().rss / 2**20, total / 2**20, len(workers)


def index_run(source: Path, db: str, samples: list[dict], kill_at: int | None, t_base: float
              ) -> tuple[int, float, str]:
    """`bicascade index` in a subprocess, sampled every 5 s; SIGKILLed once `kill_at` rows are ledgered. (exit code,
    seconds, its log)."""
    cmd = [sys.executable, "-m", "bicascade.cli", "index", str(source), "--db", db, "--ladder", train.SYNTHETIC]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    t0 = time.monotonic()
    while proc.poll() is None:
        time.sleep(5)
        d = tables.Database(db)
        done = d.count(tables.SOURCES)
        driver, workers, n = tree_rss(proc.pid)
        samples.append({"t": round(time.monotonic() - t_base, 1), "ledgered": done, "driver_mib": round(driver),
                        "workers_mib": round(workers), "workers": n})
        if kill_at is not None and done >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9, time.monotonic() - t0, "".join(log)
    if proc.returncode:
        raise SystemExit("".join(log[-40:]))
    return proc.returncode, time.monotonic() - t0, "".join(log)


def ann_quality(db: str, root: Path, queries: int, rng: np.random.Generator) -> list[dict]:
    """Level 0's ANN recall@50 against exact search, and its p50, on real text queries, over a sweep of probes."""
    d = tables.Database(db)
    ladder = query.recorded(d)
    level0 = ladder.levels[0]
    model = models.load_model(level0.spec)
    _, caps = world.load_split(root, "test")
    texts = [caps[i][0] for i in rng.choice(len(caps), queries, replace=False)]
    qv = model.encode_texts(texts)
    data = d.dataset(tables.emb_table(level0.fingerprint)).to_table(columns=["id", "vector"])
    ids = np.asarray(data.column("id").to_pylist(), dtype=object)
    matrix = data.column("vector").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    truth = [set(ids[np.argpartition(-(matrix @ q), 50)[:50]]) for q in qv]
    params = tables.ann_params(len(ids), min_rows=0)
    rows = []
    n = params.nprobes
    for nprobes in sorted({max(1, n // 2), n, min(params.num_partitions, 2 * n)}):
        for refine in (params.refine_factor, 2 * params.refine_factor):
            p = replace(params, nprobes=nprobes, refine_factor=refine)
            lat, hit = [], []
            for q, t in zip(qv, truth):
                t0 = time.perf_counter()
                got, _ = d.search(level0.fingerprint, q, 50, p)
                lat.append((time.perf_counter() - t0) * 1000)
                hit.append(len(t & set(got)) / 50)
            rows.append({"nprobes": nprobes, "refine_factor": refine, "recall_at_50": round(float(np.mean(hit)), 4),
                         "p50_ms": round(float(np.median(lat)), 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def served(db: str, root: Path, rng: np.random.Generator, seconds: float = 15.0) -> dict:
    """The million-image database through `bicascade serve`: cold searches of new texts against empty caches, then 30
    queries warmed and repeated by 1 and 8 closed-loop clients (the full cascade), through Serve's proxy and with
    direct ingress (`serve --direct`)."""
    _, caps = world.load_split(root, "test")
    picks = rng.choice(len(caps), 60, replace=False)
    cold_texts, warm_texts = [caps[i][1] for i in picks[:30]], [caps[i][2] for i in picks[30:]]
    out: dict = {"warm": []}
    for ingress, url in each_ingress(db):
        c = Client(url)
        if "cold_new_texts" not in out:
            out["cold_new_texts"] = pct([c.search({"query": q, "k": 10})[0] for q in cold_texts])
        for q in warm_texts:
            c.search({"query": q, "k": 10})
        out["warm"] += [{"ingress": ingress, **load_test(url, warm_texts, n, seconds, None)} for n in (1, 8)]
    return out


def plot(samples: list[dict], kill_t: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s["t"] for s in samples])
    done = np.array([s["ledgered"] for s in samples])
    back = np.maximum(np.arange(len(t)) - 6, 0)  # over 30 s: the ledger grows a commit (8,192 rows) at a time
    rate = (done - done[back]) / np.maximum(t - t[back], 1e-9)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(t, np.clip(rate, 0, None), label="images/s (ledger growth over 30 s)")
    a.set(ylabel="images/s", title="Indexing a million images on 2 CPU cores")
    b.plot(t, [s["driver_mib"] for s in samples], label="driver RSS")
    b.plot(t, [s["workers_mib"] for s in samples], label="Ray workers RSS (sum)")
    b.set(xlabel="seconds", ylabel="MiB")
    for ax in (a, b):
        if kill_t is not None:
            ax.axvline(kill_t, color="red", ls=":", label="SIGKILL, then resume")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--root", default="/tmp/bicascade-1m")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default="bench/results/million_cpu.json")
    ap.add_argument("--plot", default="docs/million.png")
    args = ap.parse_args()
    root = Path(args.root)
    train.ensure_ladder(train.SYNTHETIC, with_world=False)  # the default ladder, trained once
    t0 = time.monotonic()
    cfg = world.WorldConfig(seed=11, image_size=64, supersample=1, train=0, val=0, test=args.images)
    reused = world.complete(root / "world", cfg)  # make_world keeps it
    made = world.make_world(root / "world", cfg)
    generated_s = time.monotonic() - t0
    db = str(root / "db")
    shutil.rmtree(db, ignore_errors=True)  # an index job from empty, every run: a finished db would only resume
    samples: list[dict] = []
    t_base = time.monotonic()
    code, first_s, _ = index_run(made / "test", db, samples, args.images // 2, t_base)
    kill_t = samples[-1]["t"] if code == -9 else None
    killed_at = samples[-1]["ledgered"]
    _, resume_s, resumed_log = index_run(made / "test", db, samples, None, t_base)
    built = re.search(r"built (\S+) over (\d+) rows in ([\d.]+) s", resumed_log)
    d = tables.Database(db)
    level0 = query.recorded(d).levels[0]
    rows = d.count(tables.emb_table(level0.fingerprint))
    images = d.count(tables.IMAGES)
    ann = ann_quality(db, made, args.queries, np.random.default_rng(0))
    plot(samples, kill_t, Path(args.plot))
    result = {"images": args.images, "generated_s": None if reused else round(generated_s),
              "index_first_run_s": round(first_s),
              "killed_at_s": kill_t, "killed_at_ledgered": killed_at, "index_resume_s": round(resume_s), "rows": rows,
              "image_rows": images,
              "exactly_once": rows == images == args.images,
              "bytes_on_disk_per_image": round(du(Path(db)) / max(1, images)),
              "peak_driver_mib": max(s["driver_mib"] for s in samples),
              "peak_workers_mib": max(s["workers_mib"] for s in samples),
              "ann_index": built.group(1) if built else None, "ann_build_s": float(built.group(3)) if built else None,
              "samples": samples, "ann": ann}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # kept if serving fails: an hour went into it
    result["serving"] = served(db, made, np.random.default_rng(1))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
