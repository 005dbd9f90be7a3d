"""The planner: its vectorised cascade equals Algorithm 1 (fixed cutoffs) and evaluate.cascade_topk, adaptive
cutoffs send fewer candidates only where the margin allows, the frontier is Pareto-optimal, the chosen cascade
is the cheapest within the budget."""
from types import SimpleNamespace

import numpy as np
import pytest

from bicascade.cascade import Cascade, ExactIndex, Level
from bicascade.errors import BadInputError
from bicascade.pipelines.measure import evaluate, plan


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def world(n=400, q=40, dims=(8, 16, 24), seed=0):
    rng = np.random.default_rng(seed)
    return [unit(rng.normal(size=(n, d))) for d in dims], [unit(rng.normal(size=(q, d))) for d in dims]


def test_fixed_cutoffs_equal_algorithm_1():
    images, texts = world()
    first = evaluate.level0(texts[0], images[0], 200)
    top, reached, sent = evaluate.cascade_ranked(first, texts[1:], images[1:], [50, 14], 10)
    assert np.array_equal(top, evaluate.cascade_topk(texts, images, [50, 14], 10))
    assert sent == [50.0, 14.0]
    ids = [f"{i:05d}" for i in range(len(images[0]))]
    union1 = set()
    for qi in range(len(texts[0])):
        levels = [Level(f"L{j}", lambda t, j=j, qi=qi: texts[j][[qi]],
                        lambda xs, j=j: images[j][[int(x) for x in xs]]) for j in range(3)]
        out = Cascade(ExactIndex(ids, images[0]), levels, [50, 14]).search("q", k=10)
        assert [int(r.id) for r in out.results] == top[qi].tolist()
        union1 |= set(np.argsort(-(images[0] @ texts[0][qi]), kind="stable")[:50].tolist())
    assert set(np.flatnonzero(reached[0])) == union1  # what level 1 embeds over the stream: each image once


def test_adaptive_cutoffs_send_fewer_where_the_margin_allows():
    images, texts = world()
    first = evaluate.level0(texts[0], images[0], 200)
    fixed = evaluate.cascade_ranked(first, texts[1:], images[1:], [50, 14], 10)
    tight = evaluate.cascade_ranked(first, texts[1:], images[1:], [50, 14], 10, margin=0.0)
    wide = evaluate.cascade_ranked(first, texts[1:], images[1:], [50, 14], 10, margin=10.0)
    assert tight[2][0] < fixed[2][0] and tight[2][0] >= 10  # no fewer than k
    assert wide[2] == fixed[2] and np.array_equal(wide[0], fixed[0])  # a huge margin is the fixed cascade
    assert tight[1][0].sum() < fixed[1][0].sum()


def candidate(f, r, r1=None):
    return plan.Candidate(["a"], [], None, {"1": r if r1 is None else r1, "5": r, "10": r}, f, f, [], [])


def test_the_budget_and_the_frontier_on_recall_at_1_where_recall_at_10_saturates():
    cs = [candidate(16, 0.994, 0.57), candidate(13, 0.997, 0.735), candidate(6, 0.999, 0.76)]
    assert plan.choose(cs, 0.999 - 0.005).f_life_measured == 16  # at 10 every level is within half a point
    assert plan.choose(cs, 0.76 - 0.03, at=1).f_life_measured == 13
    assert plan.choose(cs, 0.76 - 0.001, at=1).f_life_measured == 6 and plan.choose(cs, 0.8, at=1) is None
    assert [c.f_life_measured for c in plan.pareto(cs, at=1)] == [16, 13, 6]
    with pytest.raises(BadInputError, match="recall@3"):
        plan.plan("db", SimpleNamespace(name="L", levels=[0, 1]), None, at=3)


def test_the_frontier_keeps_only_undominated_cascades():
    cs = [candidate(10, 0.80), candidate(8, 0.85), candidate(9, 0.70), candidate(2, 0.90), candidate(1, 0.89)]
    assert [(c.f_life_measured, c.recall["10"]) for c in plan.pareto(cs)] == [(10, 0.8), (8, 0.85), (2, 0.9)]


def test_candidates_start_at_level_0_with_falling_cutoffs():
    tried = plan.candidates(["s", "m", "l"])
    assert all(levels[0] == 0 and levels == sorted(levels) for levels, _, _ in tried)
    assert all(all(a > b for a, b in zip(cut, cut[1:])) and (not cut or cut[-1] >= 10) for _, cut, _ in tried)
    assert ([0], [], None) in tried and ([0, 1, 2], [50, 14], None) in tried and ([0, 2], [50], 0.05) in tried
