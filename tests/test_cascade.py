"""Algorithm 1 against a brute-force reference, with counting fake encoders."""
import numpy as np
import pytest

from bicascade.cascade import Cascade, DictCache, ExactIndex, Level, dedup, default_cutoffs, rank, top_m, validate
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


# --- the cost model, bounds and the response document, to the digit (their mutants survived the tests above) ---

def test_eq1_and_eq2_to_the_digit():
    from bicascade.cascade import f_latency, f_life

    assert f_life([1.0, 4.0, 16.0], 0.1) == pytest.approx(16 / (1 + 0.1 * 20))
    assert f_life([2.0, 16.0], 0.0) == pytest.approx(8.0) and f_life([2.0, 16.0], 1.0) == pytest.approx(16 / 18)
    assert f_life([1.0], 0.5, reference=16.0) == pytest.approx(16.0)  # one level against a ladder's top
    assert f_life([1.0, 4.0], 0.5, reference=16.0) == pytest.approx(16 / 3)
    for p in (-0.01, 1.01):
        with pytest.raises(BadInputError, match="p must lie in"):
            f_life([1.0, 4.0], p)
    with pytest.raises(BadInputError, match="at least 2 levels"):
        f_life([1.0], 0.1)
    assert f_latency([1.0, 4.0, 16.0], [50, 14]) == pytest.approx(50 * 16 / (4 * 50 + 16 * 14))
    assert f_latency([1.0, 2.0, 4.0, 8.0], [50, 20, 10]) == pytest.approx(50 * 8 / (2 * 50 + 4 * 20 + 8 * 10))
    assert f_latency([1.0, 16.0], [50]) is None
    with pytest.raises(BadInputError, match="needs 2 cutoffs"):
        f_latency([1.0, 4.0, 16.0], [50])


def test_default_cutoffs_interpolate_geometrically():
    assert default_cutoffs(4) == (50, 26, 14)  # 50 * (14/50) ** (1/2) = 26.5
    assert default_cutoffs(5) == (50, 33, 21, 14)


def test_the_largest_k_of_each_depth():
    from bicascade.cascade import max_k

    assert [max_k([50, 14], d) for d in (1, 2, 3)] == [50, 50, 14]
    assert max_k([], 1) == 1000


@pytest.mark.parametrize("n_levels,cutoffs,k,msg", [
    (0, [], 1, "at least one level"),
    (2, [50.0], 1, "positive integers"),
    (2, [50], 1.0, "positive integer"),
    (2, [50], -1, "positive integer"),
])
def test_validation_of_levels_and_types(n_levels, cutoffs, k, msg):
    with pytest.raises(BadInputError, match=msg):
        validate(n_levels, cutoffs, k)


def test_the_bounds_themselves_validate():
    validate(3, [50, 14], 14)  # k equal to the last cutoff
    validate(3, [np.int64(2), np.int64(1)], np.int64(1))  # numpy integers, as JSON plans load
    validate(1, [], 5)  # level 0 alone: no cutoff bounds k


def test_dedup_keeps_items_at_the_threshold_and_drops_those_above():
    v = unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]))
    assert dedup(v, 0.99) == [0, 2, 3]  # the exact duplicate goes
    assert dedup(v, 0.8) == [0, 2, 3]  # cosine 0.8 is not above 0.8: kept
    assert dedup(v, 0.79) == [0, 3]
    assert dedup(v[:0], 0.5) == []


def test_top_m_among_allowed_rows_with_ties_at_the_cut():
    ids = ["e", "d", "c", "b", "a"]
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.5], np.float32)
    assert top_m(ids, scores, 2)[0] == ["b", "a"]  # the tie at the 2nd place broken by id
    assert top_m(ids, scores, 10)[0] == ["b", "a", "c", "d", "e"]
    allowed = np.array([True, True, False, False, False])
    got, got_scores = top_m(ids, scores, 1, allowed)
    assert got == ["d"] and got_scores.tolist() == [pytest.approx(0.5)]
    assert top_m(ids, scores, 3, np.zeros(5, bool))[0] == []


def test_each_levels_stats_trail_and_provenance():
    w = World()
    cascade = Cascade(w.index, w.levels, cutoffs=[50, 14])
    w.levels[1].cache.put(w.ids[:300], w.image[1])  # level 1 fully cached: hits only
    out = cascade.search("a blue ring", k=5)
    s0, s1, s2 = out.levels
    assert (s0.model, s0.candidates, s0.cache_hits, s0.encoded, s0.gflops) == ("L0", 50, 0, 0, 0.0)
    assert (s1.candidates, s1.cache_hits, s1.encoded, s1.gflops) == (50, 50, 0, 0.0)
    assert (s2.candidates, s2.cache_hits, s2.encoded, s2.gflops) == (14, 0, 14, 1400.0)
    q = w.levels[2].encode_text(["a blue ring"])[0]
    pos = {i: n for n, i in enumerate(w.ids)}
    for r in out.results:  # a score per level, each the level's own cosine; cached per level above 0
        assert len(r.scores) == 3 and r.cached == [True, False]
        assert r.scores[2] == pytest.approx(float(w.image[2][pos[r.id]] @ q), abs=1e-6) == r.score
    np.testing.assert_allclose(out.vectors, w.image[2][[pos[r.id] for r in out.results]])  # in result order
    assert all(s.ms >= 0 for s in out.levels) and out.ms >= max(s.ms for s in out.levels)
    assert Cascade(w.index, w.levels[:1], cutoffs=[]).search("q", k=3).vectors is None  # level 0 alone


def test_timings_are_milliseconds_of_the_work_done():
    import time

    w = World(n=60)
    slow = w.levels[2].encode_images

    def sleepy(ids):
        time.sleep(0.05)
        return slow(ids)
    w.levels[2].encode_images = sleepy
    out = Cascade(w.index, w.levels, cutoffs=[20, 5]).search("q", k=3)
    assert 50 <= out.levels[2].ms < 60_000 and out.levels[1].ms < out.levels[2].ms
    assert out.levels[2].ms <= out.ms < 60_000


def test_adaptive_cutoffs_pass_on_only_the_close_candidates():
    ids = [f"i{n}" for n in range(6)]
    level0 = unit(np.array([[1, 0], [0.999, 0.045], [0.99, 0.14], [0.5, 0.87], [0.3, 0.95], [0, 1]], np.float32))
    q = np.array([1, 0], np.float32)
    seen = []

    def encode(xs):
        seen.append(list(xs))
        return level0[[ids.index(x) for x in xs]]
    levels = [Level("L0", lambda t: q[None], lambda xs: None),
              Level("L1", lambda t: q[None], encode, cache=DictCache(), gflops=1.0)]
    out = Cascade(ExactIndex(ids, level0), levels, cutoffs=[5], margin=0.02).search("q", k=1)
    assert seen == [["i0", "i1", "i2"]]  # level 0's scores 1.0, 0.999, 0.99 lie within 0.02 of the best
    assert out.levels[1].candidates == 3
    wide = Cascade(ExactIndex(ids, level0), levels, cutoffs=[5], margin=1.0).search("q", k=1)
    assert wide.levels[1].candidates == 5  # never beyond the cutoff
    narrow = Cascade(ExactIndex(ids, level0), levels, cutoffs=[5], margin=0.0).search("q", k=2)
    assert narrow.levels[1].candidates == 2  # never below k


def test_an_encoder_returning_the_wrong_count_is_caught():
    w = World()
    w.levels[1].encode_images = lambda xs: w.image[1][: len(xs) - 1]
    with pytest.raises(AssertionError, match="wrong number of vectors"):
        Cascade(w.index, w.levels, cutoffs=[50, 14]).search("q", k=5)


def test_no_allowed_image_gives_an_empty_answer():
    w = World()
    out = Cascade(w.index, w.levels, cutoffs=[50, 14]).search("q", k=5, allowed=np.zeros(300, bool))
    assert out.results == [] and [s.candidates for s in out.levels] == [0, 0, 0]
    assert [len(c) for c in w.calls] == [0, 0, 0]  # nothing to encode
