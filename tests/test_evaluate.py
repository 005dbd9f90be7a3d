"""Vectorised cascade evaluation equals Algorithm 1 per query; eval on a tiny trained ladder."""
import numpy as np
import pytest

from bicascade.cascade import Cascade, ExactIndex, Level
from bicascade.pipelines import evaluate, train


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_cascade_topk_equals_algorithm_1():
    rng = np.random.default_rng(0)
    n, dims = 400, (8, 16, 24)
    images = [unit(rng.normal(size=(n, d))) for d in dims]
    texts = [unit(rng.normal(size=(30, d))) for d in dims]
    top = evaluate.cascade_topk(texts, images, [50, 14], 10)
    ids = [f"{i:05d}" for i in range(n)]  # zero-padded: id order == index order, as in the stable sort
    for q in range(30):
        levels = [Level(f"L{j}", encode_text=lambda t, j=j: texts[j][[q]],
                        encode_images=lambda xs, j=j: images[j][[int(x) for x in xs]]) for j in range(3)]
        out = Cascade(ExactIndex(ids, images[0]), levels, [50, 14]).search("q", k=10)
        assert [int(r.id) for r in out.results] == top[q].tolist()


def test_recall():
    topk = np.array([[3, 1, 2] + [9] * 7, [0] * 10])
    assert evaluate.recall(topk, np.array([1, 5])) == {"1": 0.0, "5": 0.5, "10": 0.5}


@pytest.mark.slow
def test_eval_on_tiny_ladder():
    ladder, root = train.ensure_ladder("synthetic-tiny")
    doc = evaluate.evaluate(root, ladder, cutoffs=(50, 14))
    assert doc["queries"] == 3 * doc["images"] == 900
    assert [lv["model"] for lv in doc["levels"]] == list(ladder.levels)
    assert [c["m"] for c in doc["cascades"]] == [[50], [50], [50, 14]]
    for row in doc["levels"] + doc["cascades"]:
        r = row["recall"]
        assert 0 <= r["1"] <= r["5"] <= r["10"] <= 1
    assert doc["levels"][-1]["recall"]["10"] > 10 / 300  # better than chance
    assert all(c["f_life"] > 1 for c in doc["cascades"])
    # cutoffs covering the whole pool: the cascade is the top level
    full = evaluate.evaluate(root, ladder, cutoffs=(300, 299))
    assert full["cascades"][0]["recall"]["10"] == pytest.approx(full["levels"][-1]["recall"]["10"])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_eval_reads_level0_from_the_index(tmp_path):
    import ray

    from bicascade.pipelines import index

    ladder, root = train.ensure_ladder("synthetic-tiny")
    db = str(tmp_path / "db")
    with pytest.raises(ValueError, match="index the world's test split first"):
        evaluate.evaluate(root, ladder, db=db)
    try:
        index.run_index(str(root / "test"), db, "synthetic-tiny")
    finally:
        ray.shutdown()
    stored = evaluate.evaluate(root, ladder, db=db)
    fresh = evaluate.evaluate(root, ladder)
    assert stored["db"] == db and fresh["db"] is None
    for a, b in zip(stored["levels"] + stored["cascades"], fresh["levels"] + fresh["cascades"]):
        for k in ("1", "5", "10"):  # same vectors up to fp16 pixels in transit
            assert a["recall"][k] == pytest.approx(b["recall"][k], abs=0.01)
