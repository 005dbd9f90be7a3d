"""The p-small-world simulator: the stream generator on its own, the in-process replay through the real cascade
against independent references, and `bicascade simulate` replaying over HTTP against `bicascade serve`."""
from dataclasses import replace

import numpy as np
import pytest

from bicascade import costs, query
from bicascade.cascade import f_latency, f_life
from bicascade.pipelines.lab import train
from bicascade.pipelines.measure import evaluate, simulate

from conftest import cli_json, serving

LADDER = "synthetic-tiny"
CFG = simulate.SimConfig(p=0.3, queries=400, cutoffs=(20, 10), topic_size=5)


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


def fake_corpus(n: int = 400, captions_per_image: int = 2, dim: int = 16, seed: int = 0) -> simulate.Replayed:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    img = centres[rng.integers(20, size=n)] + 0.3 * rng.normal(size=(n, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    owner = np.repeat(np.arange(n), captions_per_image)
    txt = img[owner] + 0.2 * rng.normal(size=(len(owner), dim))
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return simulate.Replayed([f"i{i}" for i in range(n)], [f"c{i}" for i in range(len(owner))], owner[:, None], ["a"],
                           [1.0], [1.0], [img.astype(np.float32)], [txt.astype(np.float32)], [0], [0.0], [], None)


def test_stream_hits_the_requested_coverage_reproducibly():
    corpus = fake_corpus()
    cfg = simulate.SimConfig(p=0.2, queries=2000, cutoffs=(10,), topic_size=10)
    a, b = simulate.make_stream(corpus, cfg), simulate.make_stream(corpus, cfg)
    assert np.array_equal(a.caption, b.caption) and a.coverage == b.coverage  # reproducible from the seed
    assert np.array_equal(a.truth, corpus.caption_image[a.caption])
    tops = simulate.top_sets(corpus.texts[0], corpus.images[0], 10)
    assert a.coverage == len(np.unique(tops[a.caption])) / corpus.n  # the coverage it reports is the real one
    assert abs(a.coverage - 0.2) < 0.05
    covers = [simulate.make_stream(corpus, replace(cfg, p=p)).coverage for p in (0.05, 0.2, 0.5)]
    assert covers == sorted(covers) and covers[0] < covers[-1]
    wide = simulate.make_stream(corpus, replace(cfg, p=0.6, skew=1.5))
    counts = np.bincount(wide.popularity)
    assert wide.topics >= 4 and counts[0] / counts[3] == pytest.approx(4 ** 1.5, rel=0.3)  # Zipf-like popularity
    assert not np.array_equal(simulate.make_stream(corpus, replace(cfg, seed=1)).caption, a.caption)


def test_top_sets_match_a_full_sort():
    corpus = fake_corpus(n=100)
    got = simulate.top_sets(corpus.texts[0], corpus.images[0], 7)
    want = np.argsort(-(corpus.texts[0] @ corpus.images[0].T), axis=1)[:, :7]
    assert all(set(g) == set(w) for g, w in zip(got, want))
    assert simulate.top_sets(corpus.texts[0], corpus.images[0], 500).shape == (len(corpus.captions), 100)  # m > n


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_replay_through_the_real_cascade(tiny_db):
    held = evaluate.world_heldout(train.ensure_ladder(LADDER)[1])
    corpus = simulate.load_corpus(tiny_db, query.registered(LADDER), held)
    stream = simulate.make_stream(corpus, CFG)
    top = len(corpus.names) - 1
    two = simulate.replay_local(corpus, stream, [0, top], [20], 10)
    deep = simulate.replay_local(corpus, stream, [0, 1, top], [20, 10], 10)

    # recall of the replayed cascade equals the vectorised Algorithm 1 (evaluate.cascade_topk) on the same queries
    ref = evaluate.cascade_topk([corpus.texts[j][stream.caption] for j in (0, top)],
                                [corpus.images[0], corpus.images[top]], [20], 10)
    assert np.mean(two.rank < 10) == pytest.approx(np.mean((ref == stream.truth[:, None]).any(1)), abs=0.01)

    # level 1 of [0, top] encodes exactly the union of the stream's level-0 top-m_1 sets, each image once, so the
    # measured F_life is Eq. 1 at the measured coverage; the deeper cascade's top level encodes less than p
    row = simulate.summarise(corpus, stream, two, CFG.p)
    assert two.encoded[:, 1].sum() == round(stream.coverage * corpus.n)
    assert row.f_life_measured == pytest.approx(f_life([corpus.gflops[0], corpus.gflops[top]],
                                                             stream.coverage), rel=1e-9)
    deep_row = simulate.summarise(corpus, stream, deep, CFG.p)
    assert deep_row.coverage_per_level[2] < deep_row.coverage_per_level[1] <= stream.coverage + 1e-9
    assert deep_row.f_life_measured > deep_row.f_life_eq1
    # cold early, warm late
    assert row.gflops_per_query_early > row.gflops_per_query_late
    # every recall comes with its interval over the distinct targets, which holds the point estimate
    for k in ("1", "5", "10"):
        lo, hi = row.recall_ci[k]
        assert lo <= row.recall[k] <= hi
    assert deep.hits[-50:, 1:].sum() == deep.candidates[-50:, 1:].sum()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulate_command_replays_over_http_and_writes_the_report(tiny_db, tmp_path):
    with serving(tiny_db, "--m", "20,10") as server:
        doc = cli_json("simulate", "--db", tiny_db, "--p", "0.3", "--queries", "200", "--m", "20,10", "--url",
                       server.url, "--concurrency", "8", "--sweep", "0.2,0.5", "--report", str(tmp_path / "report"))
    for key in ("p_requested", "p_measured", "queries", "f_life_measured", "f_life_eq1", "recall",
                "recall_top_level", "f_latency_measured", "f_latency_eq2", "report", "distinct_targets", "recall_ci"):
        assert key in doc
    assert 0 < doc["distinct_targets"] <= 300
    http = doc["cascades"][0]
    assert http["url"] == server.url and http["errors"] == 0 and http["queries"] == 200 and http["queries_per_s"] > 0
    local = doc["cascades"][1]  # the same cascade in process: the server returns the same results
    assert http["cascade"] == local["cascade"] and abs(http["recall"]["10"] - local["recall"]["10"]) <= 0.02
    # the server started cold: its caches grew by exactly the images the in-process replay encoded
    assert http["coverage_per_level"] == pytest.approx(local["coverage_per_level"])
    assert http["f_life_measured"] == pytest.approx(local["f_life_measured"])
    assert [s["p_requested"] for s in doc["sweep"]] == [0.2, 0.5]
    assert doc["sweep"][0]["p_measured"] < doc["sweep"][1]["p_measured"]
    assert doc["f_latency_eq2"] == pytest.approx(f_latency(
        [costs.image_gflops(n) for n in http["cascade"]], [20, 10]))
    for name in ("cost.png", "hit_rate.png", "latency.png", "frontier.png", "sweep.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model / cascade |" in (tmp_path / "report" / "summary.md").read_text()


def test_stream_helpers_hold_one_chunk_of_scores_at_a_time():
    """kmeans and top_sets over n images keep O(chunk x n) scores, not O(n x n): at 100,000 images the slices of
    every chunk's argpartition together took 22 GB and the 100k-image stream was killed for memory."""
    import tracemalloc

    rng = np.random.default_rng(0)
    img = rng.normal(size=(6000, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    chunk_bytes = 512 * len(img) * (4 + 4 + 8)  # one chunk's scores, negated scores and argpartition indices
    tracemalloc.start()
    try:
        tops = simulate.top_sets(img, img, 10, chunk=512)
        top_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        labels = simulate.kmeans(img, 5000, seed=0, iters=1, chunk=512)  # n x k scores: 120 MB
        kmeans_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tops.shape == (6000, 10) and (tops == np.arange(6000)[:, None]).any(1).all()  # each finds itself
    assert labels.shape == (6000,) and len(np.unique(labels)) > 1000
    assert top_peak < 2 * chunk_bytes and kmeans_peak < 2 * chunk_bytes, (top_peak, kmeans_peak, chunk_bytes)
