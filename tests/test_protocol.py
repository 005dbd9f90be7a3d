"""The query path's typed joints: a search request checked where it is made, and `answer`, the one place a cascade's
output becomes the response (paging, min_score, dedup, the HTTP document)."""
import pytest
from test_cascade import World

from bicascade.cascade import Cascade
from bicascade.errors import BadInputError
from bicascade.protocol import Plan, SearchRequest, answer
from bicascade.storage.filters import Filter


def respond(w, req, cutoffs=(10, 4), names=("small", "mid", "top"), uris=None):
    cascade = Cascade(w.index, w.levels[:len(cutoffs) + 1], list(cutoffs))
    vectors = cascade.text_vectors(req.query)
    return answer(cascade, req, vectors, None, list(names), 3, uris or (lambda ids: {}),
                  lambda ids: w.image[0][[w.ids.index(i) for i in ids]])


def test_a_plan_is_typed_once_and_checked_against_the_ladder(tmp_path):
    doc = tmp_path / "plan.json"
    doc.write_text('{"chosen": {"cascade": ["a", "c"], "cutoffs": [20], "adaptive_margin": 0.05}, "frontier": []}')
    plan = Plan.read(doc)
    assert plan == Plan(("a", "c"), (20,), 0.05) and plan == Plan.of({"cascade": ["a", "c"], "cutoffs": ["20"],
                                                                       "adaptive_margin": "0.05"})
    assert plan.levels(["a", "b", "c"]) == [0, 2]
    for names in (["b", "a", "c"], ["a", "b"], ["c", "a"]):  # not level 0 first, a level missing, out of order
        with pytest.raises(BadInputError, match="is not levels of the ladder"):
            plan.levels(names)
    with pytest.raises(BadInputError, match="is not levels of the ladder"):
        Plan(("a", "a"), (5,)).levels(["a", "b"])
    for text, match in [("{", "cannot read plan"), ('{"chosen": {}}', "holds no chosen cascade"),
                        ('{"chosen": {"cascade": ["a"], "cutoffs": ["x"]}}', "cutoffs \\(integers\\)")]:
        doc.write_text(text)
        with pytest.raises(BadInputError, match=match):
            Plan.read(doc)
    with pytest.raises(BadInputError, match="cannot read plan"):
        Plan.read(tmp_path / "missing.json")


def test_a_request_is_checked_where_it_is_made():
    assert SearchRequest("q").k == 10 and SearchRequest(image_id="abc").depth is None
    for bad, match in [({}, "exactly one of query, image or image_id"),
                       ({"query": "q", "image_id": "a"}, "got query, image_id"), ({"query": "  "}, "blank"),
                       ({"query": "q", "k": 0}, "k: must be an integer of at least 1"),
                       ({"query": "q", "k": 2.0}, "k: must be an integer"),
                       ({"query": "q", "offset": -1}, "offset: must be an integer of at least 0"),
                       ({"query": "q", "depth": 0}, "depth: must be a positive integer"),
                       ({"query": "q", "dedup": 1.5}, "dedup: must be between -1 and 1"),
                       ({"query": "q", "min_score": -2}, "min_score: must be between -1 and 1")]:
        with pytest.raises(BadInputError, match=match):
            SearchRequest(**bad)
    req = SearchRequest.of("q", where={"uri_prefix": "a/"}, k=3)
    assert req.where == Filter(uri_prefix="a/") and req.k == 3
    with pytest.raises(BadInputError, match="where: unknown fields"):
        SearchRequest.of("q", where={"color": "red"})
    assert req.depth_of(3) == 3 and SearchRequest("q", depth=2).depth_of(3) == 2
    with pytest.raises(BadInputError, match="depth: must be between 1 and 3, got 4"):
        SearchRequest("q", depth=4).depth_of(3)


def test_the_response_document():
    w = World(n=40)
    out = respond(w, SearchRequest("q", k=2), uris=lambda ids: {i: f"/img/{i}.png" for i in ids})
    doc = out.to_json()
    assert [r["id"] for r in doc["results"]] == [h.id for h in out] and len(out) == 2
    first = doc["results"][0]
    assert first["uri"] == f"/img/{first['id']}.png" and first["score"] == out[0].score
    assert [lv["model"] for lv in first["levels"]] == ["small", "mid", "top"]
    assert [lv["cached"] for lv in first["levels"]] == [False, False, False]  # level 0 is never "cached"
    assert first["levels"][2]["score"] == first["score"]
    stats = doc["stats"]
    assert stats["text_encodes"] == 3 and stats["ms"] == out.ms and stats["gflops"] == 10 * 10.0 + 4 * 100.0
    assert stats["levels"][2] == {"model": "L2", "candidates": 4, "cache_hits": 0, "encoded": 4,
                                  "gflops": 400.0, "ms": out.levels[2].ms}
    assert stats["uncascaded_gflops"] == 100.0 * 10  # the top level over level 0's 10 candidates
    again = respond(w, SearchRequest("q", k=2), names=("s", "m", "t")).to_json()
    assert [lv["cached"] for lv in again["results"][0]["levels"]] == [False, True, True]
    assert again["results"][0]["uri"] is None  # an id without a known uri
    assert "1. " in out.format() and "3 text embedding(s)" in out.format()


def test_paging_min_score_and_dedup():
    w = World(n=60)
    full = [h.id for h in respond(w, SearchRequest("q", k=4))]
    assert [h.id for h in respond(w, SearchRequest("q", k=2, offset=2))] == full[2:4]
    assert [h.id for h in respond(w, SearchRequest("q", k=4, offset=3))] == full[3:]  # the last cutoff bounds it
    scores = [h.score for h in respond(w, SearchRequest("q", k=4))]
    kept = respond(w, SearchRequest("q", k=4, min_score=scores[1]))
    assert [h.score for h in kept] == scores[:2]
    assert [h.id for h in respond(w, SearchRequest("q", k=4, dedup=1.0))] == full  # nothing is more than equal
    assert [h.id for h in respond(w, SearchRequest("q", k=4, dedup=-1.0))] == full[:1]  # everything is a near-twin
    stored = []
    cascade = Cascade(w.index, w.levels[:1], [])
    out = answer(cascade, SearchRequest("q", k=3, dedup=-1.0), cascade.text_vectors("q"), None, ["small"], 1,
                 lambda ids: {}, lambda ids: stored.append(ids) or w.image[0][[w.ids.index(i) for i in ids]])
    assert len(out) == 1 and len(stored[0]) == 3  # depth 1 dedups on level 0's stored vectors


def fused(w, req, words, cutoffs=(10, 4), calls=None):
    """`answer` in keyword or hybrid mode over World `w`, the keyword search answering `words` (id, score) best
    first (and recording each call)."""
    cascade = Cascade(w.index, w.levels[:len(cutoffs) + 1], list(cutoffs))
    vectors = [] if req.mode == "keyword" else cascade.text_vectors(req.query)

    def keywords(text, n):
        (calls if calls is not None else []).append((text, n))
        return words[:n]
    return answer(cascade, req, vectors, None, ["small", "mid", "top"], 3, lambda ids: {},
                  lambda ids: w.image[0][[w.ids.index(i) for i in ids]], keywords)


def test_keyword_and_hybrid_modes_fuse_by_reciprocal_rank():
    from bicascade.protocol import RRF_K

    w = World(n=60)
    semantic = [h.id for h in respond(w, SearchRequest("q", k=4))]
    words = [(semantic[2], 9.0), ("img0059" if "img0059" not in semantic else "img0058", 7.5), (semantic[0], 3.0)]
    calls = []
    keyword = fused(w, SearchRequest("q", k=2, mode="keyword"), words, calls=calls)
    assert [(h.id, h.score, h.keyword_rank, h.cascade_rank, h.levels) for h in keyword] == \
        [(words[0][0], 9.0, 1, None, ()), (words[1][0], 7.5, 2, None, ())]
    assert calls == [("q", 2)] and keyword.levels == [] and keyword.gflops == 0 == keyword.uncascaded_gflops
    assert keyword.to_json()["results"][0]["keyword_rank"] == 1 and keyword.mode == "keyword"

    hybrid = fused(w, SearchRequest("q", k=4, mode="hybrid"), words, calls=calls)
    assert calls[-1] == ("q", 4)  # as many keyword results as the cascade's last cutoff keeps
    score = {h.id: h.score for h in hybrid}
    assert hybrid[0].id == semantic[0] and score[semantic[0]] == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 3))
    assert hybrid[1].id == semantic[2] and score[semantic[2]] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    ranks = {h.id: (h.keyword_rank, h.cascade_rank) for h in hybrid}
    assert ranks[semantic[0]] == (3, 1) and ranks[semantic[1]] == (None, 2)
    lexical_only = next(h for h in hybrid if h.id == words[1][0])  # found by its words alone: no level scores
    assert (lexical_only.keyword_rank, lexical_only.cascade_rank, lexical_only.levels) == (2, None, ())
    assert lexical_only.score == pytest.approx(1 / (RRF_K + 2))
    page = fused(w, SearchRequest("q", k=2, offset=2, mode="hybrid"), words)
    assert [h.id for h in page] == [h.id for h in hybrid][2:4]
    assert "[keyword #3, cascade #1]" in hybrid.format()
    kept = fused(w, SearchRequest("q", k=4, mode="hybrid", min_score=hybrid[1].score), words)
    assert [h.id for h in kept] == [h.id for h in hybrid][:2]  # min_score: the fused score
    assert len(fused(w, SearchRequest("q", k=4, mode="keyword", dedup=-1.0), words)) == 1  # level 0's vectors


def test_modes_are_checked():
    for bad, match in [({"query": "q", "mode": "fuzzy"}, "mode: must be one of semantic, keyword, hybrid"),
                       ({"image_id": "a", "mode": "keyword"}, "mode keyword: searches a text query"),
                       ({"image": b"x", "mode": "hybrid"}, "mode hybrid: searches a text query")]:
        with pytest.raises(BadInputError, match=match):
            SearchRequest(**bad)
    w = World(n=30)
    cascade = Cascade(w.index, w.levels[:1], [])
    with pytest.raises(BadInputError, match="no keyword index"):
        answer(cascade, SearchRequest("q", mode="keyword"), [], None, ["small"], 0, lambda ids: {}, lambda ids: None)
