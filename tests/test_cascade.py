"""Algorithm 1 against a brute-force reference, with counting fake encoders."""
import numpy as np
import pytest

from bicascade.cascade import Cascade, DictCache, ExactIndex, Level, default_cutoffs, rank, validate
from bicascade.errors import BadInputError


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class World:
    """N images with a different random embedding per level; encoders count what they encode."""

    def __init__(self, n=300, dims=(8, 16, 32), seed=0):
        rng = np.random.default_rng(seed)
        self.ids = [f"img{i:04d}" for i in range(n)]
        self.image = [unit(rng.normal(size=(n, d))).astype(np.float32) for d in dims]
        self.text = {}
        self.rng = rng
        self.calls = [[] for _ in dims]
        self.levels = [
            Level(f"L{j}", encode_text=self._text(j), encode_images=self._images(j),
                  cache=DictCache() if j else None, gflops=float(10 ** j))
            for j in range(len(dims))
        ]
        self.index = ExactIndex(self.ids, self.image[0])

    def _text(self, j):
        def encode(texts):
            return np.stack([self.text.setdefault((t, j), unit(np.random.default_rng(abs(hash((t, j))) % 2**32)
                                                              .normal(size=self.image[j].shape[1]))) for t in texts])
        return encode

    def _images(self, j):
        pos = {i: n for n, i in enumerate(self.ids)}

        def encode(ids):
            self.calls[j].append(list(ids))
            return self.image[j][[pos[i] for i in ids]]
        return encode

    def brute(self, query, j):
        q = self.levels[j].encode_text([query])[0]
        return rank(self.ids, self.image[j] @ q)


def test_full_cutoffs_equal_top_level_ranking():
    w = World(n=120)
    # m_1 = N: every image reaches level 1; m_2 = N - 1: level 2 ranks all but level 1's last image, exactly as
    # the top level alone ranks them
    out = Cascade(w.index, w.levels, cutoffs=[120, 119]).search("a red cube", k=119)
    level1_ids, _ = w.brute("a red cube", 1)
    ref_ids, ref_scores = w.brute("a red cube", 2)
    keep = [n for n, i in enumerate(ref_ids) if i != level1_ids[-1]]
    assert [r.id for r in out.results] == [ref_ids[n] for n in keep]
    np.testing.assert_allclose([r.score for r in out.results], ref_scores[keep], rtol=1e-6)
    # and the 2-level cascade with m_1 = N is the top level's whole ranking
    two = Cascade(w.index, [w.levels[0], w.levels[2]], cutoffs=[120]).search("a red cube", k=120)
    assert [r.id for r in two.results] == ref_ids


def test_misses_encoded_in_one_batch_and_written_back():
    w = World()
    out = Cascade(w.index, w.levels, cutoffs=[50, 14]).search("q", k=5)
    assert [len(c) for c in w.calls] == [0, 1, 1]  # one batched call per level
    assert len(w.calls[1][0]) == 50 and len(w.calls[2][0]) == 14
    assert out.levels[1].encoded == 50 and out.levels[1].cache_hits == 0
    assert out.levels[2].gflops == 14 * 100.0
    assert out.gflops == 50 * 10.0 + 14 * 100.0
    assert len(w.levels[1].cache.vectors) == 50


def test_repeated_query_encodes_nothing_and_hits_cache():
    w = World()
    cascade = Cascade(w.index, w.levels, cutoffs=[50, 14])
    first = cascade.search("q", k=5)
    calls = [len(c) for c in w.calls]
    again = cascade.search("q", k=5)
    assert [len(c) for c in w.calls] == calls
    assert [s.encoded for s in again.levels] == [0, 0, 0]
    assert [s.cache_hits for s in again.levels[1:]] == [50, 14]
    assert [r.id for r in again.results] == [r.id for r in first.results]
    assert all(all(r.cached) for r in again.results) and not any(any(r.cached) for r in first.results)


def test_cache_hits_never_call_encoder():
    w = World()
    pos = {i: n for n, i in enumerate(w.ids)}
    w.levels[1].cache.put(w.ids, w.image[1][[pos[i] for i in w.ids]])
    Cascade(w.index, w.levels, cutoffs=[50, 14]).search("q", k=5)
    assert w.calls[1] == [] and len(w.calls[2]) == 1


def test_ties_break_by_id():
    ids = ["b", "a", "c", "d"]
    assert rank(ids, np.array([1.0, 1.0, 2.0, 1.0]))[0] == ["c", "a", "b", "d"]
    w = World(n=4)
    w.index = ExactIndex(ids, np.full((4, 8), 8 ** -0.5, np.float32))  # every image scores the same
    for lv, d in zip(w.levels[1:], (16, 32)):
        lv.encode_images = lambda xs, d=d: np.full((len(xs), d), d ** -0.5, np.float32)
    out = Cascade(w.index, w.levels, cutoffs=[4, 3]).search("q", k=3)
    assert [r.id for r in out.results] == ["a", "b", "c"]


def test_shared_text_tower_computed_once():
    w = World()
    calls = []

    def shared(texts):
        calls.append(texts)
        return np.ones((len(texts), 8), np.float32) / np.sqrt(8)
    for lv in w.levels:
        lv.encode_text = shared
    w.levels[1].encode_images = lambda ids: np.ones((len(ids), 8), np.float32)
    w.levels[2].encode_images = lambda ids: np.ones((len(ids), 8), np.float32)
    Cascade(w.index, w.levels, cutoffs=[50, 14]).search("q", k=5)
    assert len(calls) == 1


@pytest.mark.parametrize("cutoffs,k,msg", [
    ([14, 50], 5, "strictly decreasing"),
    ([50, 50], 5, "strictly decreasing"),
    ([50], 5, "needs 2 cutoffs"),
    ([50, 14], 20, "exceeds the last cutoff"),
    ([50, 14], 0, "positive integer"),
    ([50, 0], 1, "positive integers"),
])
def test_validation(cutoffs, k, msg):
    with pytest.raises(BadInputError, match=msg):
        validate(3, cutoffs, k)


def test_default_cutoffs():
    assert default_cutoffs(1) == () and default_cutoffs(2) == (50,) and default_cutoffs(3) == (50, 14)
    deep = default_cutoffs(5)
    assert deep[0] == 50 and deep[-1] == 14 and list(deep) == sorted(deep, reverse=True)
    validate(5, deep, 10)


def test_search_rejects_k_above_cutoff():
    w = World()
    with pytest.raises(BadInputError, match="exceeds"):
        Cascade(w.index, w.levels, cutoffs=[50, 14]).search("q", k=15)
