"""The simulation report: PNG plots (cost over the stream, cache hit rate, latency, the recall / F_life frontier,
the p sweep) and a markdown summary with the table in the shape of the paper's Table 1."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

if TYPE_CHECKING:
    from bicascade.pipelines.measure.simulate import Replayed, Trace

matplotlib.use("Agg")  # files only: no display on servers


def label(corpus: Replayed, trace: Trace) -> str:
    return " -> ".join(corpus.names[j] for j in trace.levels) + (" (HTTP)" if trace.http else "")


def save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bins(n: int, count: int = 40) -> list[tuple[int, int]]:
    """Log-spaced [start, end) query ranges: the cold start takes a few hundred queries, the stream thousands."""
    edges = np.unique(np.geomspace(1, n + 1, count + 1).astype(int)) - 1
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def binned(x: np.ndarray, fn) -> tuple[np.ndarray, np.ndarray]:
    ranges = bins(len(x))
    return np.array([(a + b + 1) / 2 for a, b in ranges]), np.array([fn(x[a:b]) for a, b in ranges])


def plot_cost(path: Path, corpus: Replayed, traces: list[Trace]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in traces:
        c = np.array([corpus.gflops[j] for j in t.levels])
        spent = corpus.n * c[0] + np.cumsum(t.encoded[:, 1:] @ c[1:])
        ax.plot(np.arange(1, len(t.ms) + 1), spent, label=label(corpus, t))
    ax.axhline(corpus.n * corpus.gflops[-1], color="k", ls="--", label=f"uncascaded {corpus.names[-1]}")
    ax.set(xlabel="queries", ylabel="image-encoder GFLOPs so far (index + cache misses)", xscale="log",
           yscale="log", title="Lifetime image-encoding cost over the stream")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_hit_rate(path: Path, corpus: Replayed, traces: list[Trace]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in traces:
        hits, cands = t.hits[:, 1:].sum(1), np.maximum(1, t.candidates[:, 1:].sum(1))
        ax.plot(*binned(hits / cands, np.mean), marker=".", label=label(corpus, t))
    ax.set(xlabel="queries (log scale)", ylabel="cache hit rate, levels >= 1", xscale="log", ylim=(0, 1.02),
           title="The cache warms up as the stream revisits its topics")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_latency(path: Path, corpus: Replayed, traces: list[Trace]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for t, colour in zip(traces, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for q, style in ((50, "-"), (99, ":")):
            ax.plot(*binned(t.ms, lambda v, q=q: np.percentile(v, q)), style, color=colour,
                    label=f"{label(corpus, t)} p{q}")
    ax.set(xlabel="queries (log scale)", ylabel="latency ms", xscale="log", yscale="log",
           title="Query latency over the stream (cold start, then cached)")
    ax.legend(fontsize=7)
    save(fig, path)


def plot_frontier(path: Path, doc: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, k in zip(axes, ("1", "10")):
        for lv in doc["levels"]:
            ax.scatter(lv["f_life_eq1"], lv["recall"][k], marker="s", color="grey")
            ax.annotate(lv["cascade"][0], (lv["f_life_eq1"], lv["recall"][k]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        for row, colour in zip(doc["cascades"], colours):
            name = " -> ".join(row["cascade"]) + (" (HTTP)" if row.get("url") else "")
            ax.scatter(row["f_life_measured"], row["recall"][k], color=colour, label=f"{name} measured")
            ax.scatter(row["f_life_eq1"], row["recall"][k], facecolors="none", edgecolors=colour, s=60,
                       label=f"{name} Eq. 1")
        ax.set(xscale="log", xlabel="F_life (squares: single levels, c_top / c_level)", ylabel=f"Recall@{k}",
               title=f"Recall@{k} vs lifetime cost reduction (p = {doc['p_measured']:.3f})")
    axes[1].legend(fontsize=6, loc="best")
    save(fig, path)


def plot_sweep(path: Path, doc: dict) -> None:
    rows = doc["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    p = [r["p_measured"] for r in rows]
    ax.plot(p, [r["f_life_measured"] for r in rows], "o-", label="measured")
    ax.plot(p, [r["f_life_eq1"] for r in rows], "x--", label="Eq. 1 at the measured p")
    ax.set(xscale="log", xlabel="p (measured coverage of the corpus)", ylabel="F_life",
           title=" -> ".join(rows[0]["cascade"]))
    ax.legend()
    save(fig, path)


def table(doc: dict) -> str:
    lines = ["| model / cascade | m | GFLOPs | R@1 | R@5 | R@10 | F_life measured | F_life Eq. 1 | level coverage |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lv in doc["levels"]:
        r = lv["recall"]
        lines.append(f"| {lv['cascade'][0]} | | {lv['gflops']:.4f} | {r['1']:.3f} | {r['5']:.3f} | {r['10']:.3f} | "
                     f"| {lv['f_life_eq1']:.2f} | |")
    for row in doc["cascades"]:
        r = row["recall"]
        name = " -> ".join(row["cascade"]) + (f" (HTTP, {row['errors']} errors)" if row.get("url") else "")
        cover = ", ".join(f"{c:.3f}" for c in row["coverage_per_level"][1:])
        lines.append(f"| {name} | {','.join(map(str, row['m']))} | | {r['1']:.3f} | {r['5']:.3f} | {r['10']:.3f} | "
                     f"{row['f_life_measured']:.2f} | {row['f_life_eq1']:.2f} | {cover} |")
    return "\n".join(lines)


def summary(doc: dict) -> str:
    head = doc["cascades"][0]
    r10, (lo, hi), top10 = head["recall"]["10"], head["recall_ci"]["10"], doc["recall_top_level"]["10"]
    parts = [f"# p-small-world simulation: ladder {doc['ladder']}",
             f"{doc['queries']} queries over {doc['images']} images, {doc['topics']} topics in play (Zipf skew "
             f"{doc['skew']}, seed {doc['seed']}); p asked {doc['p_requested']}, measured {doc['p_measured']:.4f} "
             "(union of the level-0 top-m_1 sets).",
             "Single levels rank the whole corpus (their F_life is c_top / c_level); cascades are replayed with cold "
             "caches. Level coverage: the fraction of the corpus each level >= 1 encoded; Eq. 1 assumes every level "
             "encodes p of it.", table(doc),
             f"- Requested cascade: F_life measured {head['f_life_measured']:.2f} vs Eq. 1 {head['f_life_eq1']:.2f} "
             f"({100 * (head['f_life_measured'] / head['f_life_eq1'] - 1):+.1f}%)."
             + ("" if head["f_life_measured_seconds"] is None else
                f" In measured seconds {head['f_life_measured_seconds']:.2f}: a miss batch is fetched from the "
                "database, decoded and encoded, while the uncascaded baseline embeds the whole corpus in large "
                "batches from files; for small models that per-call work, not FLOPs, dominates."),
             f"- R@10 {r10:.4f} (95% CI {lo:.4f}-{hi:.4f} over {doc['distinct_targets']} distinct target images) vs "
             f"the top level alone {top10:.4f} ({100 * (r10 - top10):+.2f} points).",
             f"- Image GFLOPs per query, first vs last 10% of the stream: {head['gflops_per_query_early']:.4f} vs "
             f"{head['gflops_per_query_late']:.4f}; cache hit rate overall {head['cache_hit_rate']:.3f}.",
             f"- Latency p50 {head['latency_ms']['p50']:.1f} ms, p99 {head['latency_ms']['p99']:.1f} ms"
             + (f", {head['queries_per_s']:.1f} queries/s, {head['errors']} errors." if head.get("queries_per_s")
                else ".")]
    if doc["f_latency_measured"] is not None:
        parts.append(f"- Early (cold) queries: the 2-level cascade's latency over the 3-level one's "
                     f"{doc['f_latency_measured']:.2f} vs Eq. 2 {doc['f_latency_eq2']:.2f}.")
    if doc["sweep"]:
        parts.append("## Sweep over p\n\n| p asked | p measured | F_life measured | F_life Eq. 1 | R@10 |\n"
                     "|---|---|---|---|---|\n"
                     + "\n".join(f"| {r['p_requested']} | {r['p_measured']:.4f} | {r['f_life_measured']:.2f} | "
                                 f"{r['f_life_eq1']:.2f} | {r['recall']['10']:.4f} |" for r in doc["sweep"]))
    parts.append("Plots: cost.png, hit_rate.png, latency.png, frontier.png" + (", sweep.png" if doc["sweep"] else ""))
    return "\n\n".join(parts) + "\n"


def write(out: Path, doc: dict, corpus: Replayed, traces: list[Trace]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot_cost(out / "cost.png", corpus, traces)
    plot_hit_rate(out / "hit_rate.png", corpus, traces)
    plot_latency(out / "latency.png", corpus, traces)
    plot_frontier(out / "frontier.png", doc)
    if doc["sweep"]:
        plot_sweep(out / "sweep.png", doc)
    (out / "summary.md").write_text(summary(doc))
    return out
