"""`bicascade plan`: the quality-cost frontier of a ladder's cascades, and the cheapest one within a recall budget.

Every cascade that starts with the indexed level 0 (any subset of the upper levels, a grid of cutoffs, fixed or
adaptive) is run on all held-out queries at once (the world's test captions, or a user's labelled queries over their
own database): Recall@1/5/10 against the top level alone, and cost both by
Eq. 1 at p and as measured on a simulated p-small-world stream, where a level's lifetime cost is the number of
distinct images that ever reach it (each is embedded once and cached). Adaptive cutoffs (beyond the paper) pass
to the next level only the candidates whose score is within a margin of the k-th best, between k and m_j.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bicascade.cascade import f_life
from bicascade.errors import BadInputError
from bicascade.levels import ResolvedLadder
from bicascade.pipelines.measure import evaluate, simulate

log = logging.getLogger("bicascade")
M1_GRID = (10, 14, 20, 30, 50, 100, 200)
M2_GRID = (10, 14, 20, 30, 50, 100)
MARGINS = (0.01, 0.02, 0.05, 0.1)


@dataclass
class Candidate:
    cascade: list[str]
    cutoffs: list[int]
    adaptive_margin: float | None
    recall: dict[str, float]
    f_life_eq1: float
    f_life_measured: float
    encoded_per_query: list[float]  # mean candidates a query sends to each level >= 1 (adaptive sends fewer)
    coverage: list[float]  # fraction of the corpus each level >= 1 embeds over the stream

    @property
    def key(self) -> tuple:
        return tuple(self.cascade), tuple(self.cutoffs), self.adaptive_margin


@dataclass
class PlanReport:
    ladder: str
    p: float
    p_measured: float
    recall_loss_points: float
    at: int  # the recall@k the budget and the frontier are on
    reference: dict  # the top level alone: its recall
    chosen: Candidate | None
    frontier: list[Candidate]
    candidates: int
    queries: int
    stream_queries: int

    def to_json(self) -> dict:
        return {"ladder": self.ladder, "p": self.p, "p_measured": self.p_measured,
                "recall_loss_points": self.recall_loss_points, "at": self.at, "reference": self.reference,
                "chosen": asdict(self.chosen) if self.chosen else None,
                "frontier": [asdict(c) for c in self.frontier], "candidates": self.candidates,
                "queries": self.queries, "stream_queries": self.stream_queries}

    def format(self) -> str:
        at = str(self.at)
        lines = [f"{self.candidates} cascades of {self.ladder} on {self.queries} held-out queries; cost measured on a "
                 f"{self.stream_queries}-query stream at p = {self.p_measured:.3f}; top level alone R@{at} "
                 f"{self.reference['recall'][at]:.4f}", f"frontier on R@{at} (cheapest first):",
                 f"  {'cascade':<44} {'m':<10} {'margin':<7} {'R@1':>6} {'R@10':>6} {'F_life':>7} {'Eq. 1':>7}"]
        for c in self.frontier:
            lines.append(f"  {' -> '.join(c.cascade):<44} {','.join(map(str, c.cutoffs)):<10} "
                         f"{c.adaptive_margin if c.adaptive_margin is not None else '':<7} {c.recall['1']:>6.3f} "
                         f"{c.recall['10']:>6.3f} {c.f_life_measured:>7.2f} {c.f_life_eq1:>7.2f}")
        if self.chosen:
            c = self.chosen
            lines.append(f"chosen (R@{at} loss <= {self.recall_loss_points} points): {' -> '.join(c.cascade)} "
                         f"m = {c.cutoffs}" + (f", adaptive margin {c.adaptive_margin}" if c.adaptive_margin else "")
                         + f": R@{at} {c.recall[at]:.4f}, F_life {c.f_life_measured:.2f} measured, "
                         f"{c.f_life_eq1:.2f} by Eq. 1")
        return "\n".join(lines)


Trial = tuple[list[int], list[int], float | None]  # levels, cutoffs, adaptive margin


def candidates(names: Sequence[str], margins: Sequence[float] = MARGINS) -> list[Trial]:
    """(levels, cutoffs, margin) to try: level 0 first, then any rising subset of the upper levels."""
    out = []
    upper = list(range(1, len(names)))
    for r in range(0, len(upper) + 1):
        for subset in itertools.combinations(upper, r):
            levels = [0, *subset]
            grids = [M1_GRID, M2_GRID, M2_GRID][:len(subset)]
            for cut in itertools.product(*grids):
                if any(a <= b for a, b in zip(cut, cut[1:])) or (cut and cut[-1] < 10):
                    continue
                out.append((levels, list(cut), None))
                if cut:
                    out += [(levels, list(cut), m) for m in margins]
    return out


def plan(db: str, ladder: ResolvedLadder, held: evaluate.HeldOut, p: float = 0.1, recall_loss: float = 0.5,
         stream_queries: int = 10_000, device: str | None = None, at: int = 10) -> PlanReport:
    """The frontier and the cheapest cascade whose R@`at` on the held-out queries is within `recall_loss` points of the
    top level's."""
    if len(ladder.levels) < 2:
        raise BadInputError(f"ladder {ladder.name} has one level: nothing to plan")
    if at not in evaluate.KS:
        raise BadInputError(f"recall@{at} is not measured: pick one of {', '.join(map(str, evaluate.KS))}")
    k = max(evaluate.KS)
    corpus = simulate.load_corpus(db, ladder, held, device)
    truth = corpus.relevant
    stream = simulate.make_stream(corpus, simulate.SimConfig(p=p, queries=stream_queries, cutoffs=(50, 14)))
    n = corpus.n
    gflops = corpus.gflops
    top = len(ladder.levels) - 1
    ref_top = evaluate.cascade_topk([corpus.texts[top]], [corpus.images[top]], [], k)
    reference = {"cascade": [ladder.names[top]], "recall": evaluate.recall(ref_top, truth)}
    found: list[Candidate] = []
    tried = candidates(ladder.names)
    log.info("planning over %d cascades of %s (%d held-out queries, a %d-query stream)", len(tried), ladder.name,
             len(truth), len(stream.caption))
    deepest = max(M1_GRID)
    held_out = evaluate.level0(corpus.texts[0], corpus.images[0], deepest)
    streamed = evaluate.level0(corpus.texts[0][stream.caption], corpus.images[0], deepest)
    for levels, cut, margin in tried:
        texts = [corpus.texts[j] for j in levels[1:]]
        vecs = [corpus.images[j] for j in levels[1:]]
        topk, _, sent = evaluate.cascade_ranked(held_out, texts, vecs, cut, k, margin)
        _, reached, _ = evaluate.cascade_ranked(streamed, [t[stream.caption] for t in texts], vecs, cut, k, margin)
        c = [gflops[j] for j in levels]
        spent = n * c[0] + sum(cj * r.sum() for cj, r in zip(c[1:], reached))
        found.append(Candidate(
            cascade=[ladder.names[j] for j in levels], cutoffs=cut, adaptive_margin=margin,
            recall=evaluate.recall(topk, truth),
            f_life_eq1=f_life(c, stream.coverage, gflops[top]),  # Eq. 1 against the ladder's top level
            f_life_measured=n * gflops[top] / spent, encoded_per_query=[round(s, 2) for s in sent],
            coverage=[float(r.mean()) for r in reached]))
    chosen = choose(found, reference["recall"][str(at)] - recall_loss / 100, at)
    return PlanReport(ladder.name, p, stream.coverage, recall_loss, at, reference, chosen, pareto(found, at),
                      len(found), len(truth), len(stream.caption))


def choose(found: list[Candidate], budget: float, at: int = 10) -> Candidate | None:
    """The cheapest cascade whose R@`at` reaches `budget` (of two as cheap, the one that sends fewer candidates)."""
    within = [c for c in found if c.recall[str(at)] >= budget - 1e-12]
    return max(within, key=lambda c: (c.f_life_measured, -sum(c.cutoffs))) if within else None


def pareto(found: list[Candidate], at: int = 10) -> list[Candidate]:
    """Cascades no other beats on both R@`at` and measured F_life, cheapest (highest F_life) first."""
    best = sorted(found, key=lambda c: (-c.f_life_measured, -c.recall[str(at)]))
    out, top = [], -1.0
    for c in best:
        if c.recall[str(at)] > top + 1e-12:
            out.append(c)
            top = c.recall[str(at)]
    return out


def plot(report: PlanReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = str(report.at)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for c in report.frontier:
        marker = "^" if c.adaptive_margin is not None else "o"
        ax.scatter(c.f_life_measured, c.recall[at], marker=marker, color="C0" if marker == "o" else "C1")
    fixed = [c for c in report.frontier if c.adaptive_margin is None]
    ax.plot([c.f_life_measured for c in fixed], [c.recall[at] for c in fixed], "-", color="C0", alpha=.5,
            label="fixed cutoffs (frontier)")
    adaptive = [c for c in report.frontier if c.adaptive_margin is not None]
    if adaptive:
        ax.scatter([], [], marker="^", color="C1", label="adaptive cutoffs")
    ax.axhline(report.reference["recall"][at], color="k", ls="--", lw=1, label="top level alone")
    ax.axhline(report.reference["recall"][at] - report.recall_loss_points / 100, color="grey", ls=":", lw=1,
               label=f"budget: -{report.recall_loss_points} points")
    if report.chosen:
        ax.scatter(report.chosen.f_life_measured, report.chosen.recall[at], s=160, facecolors="none",
                   edgecolors="red", label="chosen")
    ax.set(xscale="log", xlabel=f"F_life measured on the stream (p = {report.p_measured:.3f})", ylabel=f"Recall@{at}",
           title=f"Quality-cost frontier of {report.ladder}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

