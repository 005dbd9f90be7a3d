"""The search product through a real Serve app on 127.0.0.1: search by image (an indexed one and an upload), filters
applied before level 0, min_score, paging, dedup, thumbnails, Prometheus metrics summed over two router and two
ingress replicas, and clip-retrieval's protocol (its own ClipClient when it can be fetched)."""
import base64
import io
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import requests
from PIL import Image

from bicascade import query
from bicascade.errors import NotIndexedError
from bicascade.serve.app import AppConfig
from bicascade.storage import tables

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


@pytest.fixture(scope="module")
def url(tiny_db, in_process_server):
    return in_process_server(AppConfig(db=tiny_db, replicas={"Api": 2}))


def post(url, body, path="/search"):
    r = requests.post(f"{url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def uris(doc):
    return [r["uri"] for r in doc["results"]]


def test_an_indexed_image_finds_itself_first_by_id_and_by_upload(url, tiny_db):
    ids = [r["id"] for r in post(url, {"query": "two blue squares", "k": 5})["results"]]
    for target in ids[:3]:
        by_id = post(url, {"image_id": target, "k": 5})
        assert by_id["results"][0]["id"] == target
        assert by_id["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert all(step["score"] == pytest.approx(1.0, abs=1e-4) for step in by_id["results"][0]["levels"])
        data = requests.get(f"{url}/images/{target}", timeout=30).content
        upload = post(url, {"image": base64.b64encode(data).decode(), "k": 5})
        assert upload["results"][0]["id"] == target
    r = requests.post(f"{url}/search", json={"image_id": "f" * 32}, timeout=30)
    assert r.status_code == 404 and "no indexed image" in r.json()["error"]
    big = io.BytesIO()
    Image.new("RGB", (6000, 6000)).save(big, "PNG")  # 36 MP: over the upload's pixel cap, refused before decoding
    r = requests.post(f"{url}/search", json={"image": base64.b64encode(big.getvalue()).decode()}, timeout=60)
    assert r.status_code == 422 and "pixels" in r.json()["error"]


def test_filters_apply_before_level_0_so_k_matching_images_come_back(url, tiny_db):
    rows = tables.Database(tiny_db).dataset(tables.IMAGES).to_table(columns=["uri"]).column("uri").to_pylist()
    prefix = sorted(rows)[0].rsplit("/", 1)[0] + "/00001"  # ten files: test/000010 .. test/000019
    matching = sorted(u for u in rows if u.startswith(prefix))
    assert len(matching) == 10
    plain = post(url, {"query": "a large red circle", "k": 14})
    assert not set(uris(plain)) >= set(matching)  # the filter must do work level 0 would not do
    got = post(url, {"query": "a large red circle", "k": 10, "where": {"uri_prefix": prefix}})
    assert sorted(uris(got)) == matching
    assert post(url, {"query": "a large red circle", "where": {"uri_prefix": prefix + "9"}})["results"][0]["uri"] \
        == matching[-1]
    none = post(url, {"query": "a large red circle", "where": {"uri_prefix": "/no/such/folder/"}})
    assert none["results"] == []
    # capture filters over HTTP: the world's files record no camera, date or place, so none matches; the types do
    png = post(url, {"query": "a large red circle", "k": 3, "where": {"media_type": ["png", "image/jpeg"]}})
    assert len(png["results"]) == 3
    for where in ({"camera": "canon"}, {"taken_after": "2000-01-01T00:00"}, {"near": {"lat": 0, "lon": 0, "km": 1e4}},
                  {"media_type": "heic"}):
        assert post(url, {"query": "a large red circle", "where": where})["results"] == [], where
    for where in ({"taken_after": "2024-02-30"}, {"taken_before": "2024-12-24T18:30+01:00"}, {"near": {"lat": 0}},
                  {"camera": []}):
        r = requests.post(f"{url}/search", json={"query": "a circle", "where": where}, timeout=30)
        assert r.status_code == 422 and "where" in r.text, (where, r.text)


def test_keyword_and_hybrid_search_over_http(url, tiny_db):
    """The index job built a full-text index over each image's words (here its path: the world has no captions in
    the table): keyword mode finds a file by a word of its name, hybrid fuses that list with the cascade's."""
    rows = tables.Database(tiny_db).dataset(tables.IMAGES).to_table(columns=["id", "uri"]).to_pylist()
    target = sorted(rows, key=lambda r: r["uri"])[7]
    stem = target["uri"].rsplit("/", 1)[1].split(".")[0]  # e.g. 000017
    got = post(url, {"query": stem, "k": 3, "mode": "keyword"})
    assert got["results"][0]["id"] == target["id"] and got["results"][0]["keyword_rank"] == 1
    assert got["results"][0]["levels"] == [] and got["stats"]["text_encodes"] == 0  # no embedding computed
    hybrid = post(url, {"query": f"a large red circle {stem}", "k": 14, "mode": "hybrid"})
    ranks = {r["id"]: (r["keyword_rank"], r["cascade_rank"]) for r in hybrid["results"]}
    assert ranks[target["id"]][0] == 1 and any(c is not None for _, c in ranks.values())
    assert [r["score"] for r in hybrid["results"]] == sorted((r["score"] for r in hybrid["results"]), reverse=True)
    assert "keyword_rank" not in post(url, {"query": "a large red circle", "k": 3})["results"][0]  # semantic as before
    filtered = post(url, {"query": stem, "k": 3, "mode": "keyword", "where": {"uri_prefix": "/no/such/"}})
    assert filtered["results"] == []
    for body in ({"query": "x", "mode": "fuzzy"}, {"image_id": target["id"], "mode": "keyword"}):
        r = requests.post(f"{url}/search", json=body, timeout=30)
        assert r.status_code == 422, r.text


def flushed_vectors(db: tables.Database, fingerprint: str, ids: list[str], timeout_s: float = 60) -> np.ndarray:
    """The stored vectors of `ids` once the write-back cache writers have flushed them (every 2 s by default)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return db.vectors(fingerprint, ids)
        except NotIndexedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_min_score_paging_and_dedup(url, tiny_db):
    full = post(url, {"query": "three small green stars", "k": 14})
    assert len(full["results"]) == 14
    page = post(url, {"query": "three small green stars", "k": 5, "offset": 5})
    assert [r["id"] for r in page["results"]] == [r["id"] for r in full["results"][5:10]]
    cut = full["results"][6]["score"]
    kept = post(url, {"query": "three small green stars", "k": 14, "min_score": cut})
    assert [r["id"] for r in kept["results"]] == [r["id"] for r in full["results"] if r["score"] >= cut]
    # dedup: no two results closer than the threshold, as the top level embeds them
    db = tables.Database(tiny_db)
    top = query.open_ladder(db, None).levels[-1]
    threshold = 0.9
    deduped = post(url, {"query": "three small green stars", "k": 14, "dedup": threshold})
    ids = [r["id"] for r in deduped["results"]]
    vectors = flushed_vectors(db, top.fingerprint, ids)
    sims = vectors @ vectors.T - 2 * np.eye(len(ids))
    assert sims.max() <= threshold + 1e-5 and len(ids) < 14  # near-duplicates in the pool collapse
    assert ids[0] == full["results"][0]["id"]
    assert len({r["id"] for r in full["results"]}) == 14  # exact duplicates (same bytes) are one row, never twice


def test_thumbnails_are_small_jpegs_with_cache_headers(url):
    hit = post(url, {"query": "a red circle", "k": 1})["results"][0]["id"]
    original = requests.get(f"{url}/images/{hit}", timeout=30)
    thumb = requests.get(f"{url}/images/{hit}?size=64", timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "max-age" in thumb.headers["cache-control"] and thumb.headers["etag"]
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 64
    assert original.content[:4] != thumb.content[:4] or len(original.content) != len(thumb.content)
    assert requests.get(f"{url}/images/{hit}?size=5", timeout=30).status_code == 422


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}\{{{want}[^}}]*\}} (\S+)$" if labels else rf"^{name} (\S+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def settled_metrics(url: str) -> str:
    """/metrics once earlier requests' counts have all reached the hub: two reads 2.5 s apart that agree."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    for _ in range(20):
        time.sleep(2.5)
        again = requests.get(f"{url}/metrics", timeout=30).text
        if metric(again, "bicascade_level_candidates_total", level="1") == \
                metric(text, "bicascade_level_candidates_total", level="1"):
            return again
        text = again
    raise AssertionError("the metrics never settled")


def test_metrics_count_every_replica(url):
    first = requests.get(f"{url}/metrics", timeout=30).text  # the server's first render
    assert metric(first, "bicascade_cache_rows", level="0") == 300  # gauges reach the hub before a render, not after
    before = settled_metrics(url)
    words = ("one", "two", "three", "four", "five", "six")
    docs = [post(url, {"query": f"{n} purple hexagons", "k": 5}) for n in words]
    bad = [requests.post(f"{url}/search", json={"query": ""}, timeout=30) for _ in range(3)]
    assert all(r.status_code == 422 for r in bad)
    deadline = 30
    while deadline:  # replicas hand their counts to the hub every second
        text = requests.get(f"{url}/metrics", timeout=30).text
        grown = metric(text, "bicascade_level_candidates_total", level="1") - \
            metric(before, "bicascade_level_candidates_total", level="1")
        refused = metric(text, "bicascade_responses_total", route="/search", status="4xx") - \
            metric(before, "bicascade_responses_total", route="/search", status="4xx")
        if grown >= sum(d["stats"]["levels"][1]["candidates"] for d in docs) and refused >= 3:
            break
        deadline -= 1
        time.sleep(1)
    assert grown == sum(d["stats"]["levels"][1]["candidates"] for d in docs)
    encoded = metric(text, "bicascade_level_images_encoded_total", level="2") - \
        metric(before, "bicascade_level_images_encoded_total", level="2")
    assert encoded == sum(d["stats"]["levels"][2]["encoded"] for d in docs)
    assert refused == 3
    assert metric(text, "bicascade_query_seconds_count", depth="3") >= 6
    assert metric(text, "bicascade_cache_rows", level="0") == 300
    for name in ("bicascade_level_cache_hits_total", "bicascade_level_encoder_gflops_total",
                 "bicascade_level_encode_seconds_bucket", "bicascade_text_encodes_total"):
        assert name in text
    # the two router replicas both served: their counts were summed, not one replica's shown
    stats = requests.get(f"{url}/stats", timeout=30).json()
    assert stats["replicas"]["Api"] == 2
    # the tiny ladder's three levels (well under a GFLOP each) share one Encoder deployment: one process to start
    assert stats["replicas"] == {"Api": 2, "Encoder0": 1}


def clip_client_module(tmp_path):
    """clip-retrieval's own client file, from its wheel (it needs only requests; the package's __init__ would
    import its whole server stack)."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp_path),
                        "clip-retrieval==2.45.0"], capture_output=True, text=True, timeout=300)
    wheels = list(tmp_path.glob("clip_retrieval-*.whl"))
    if r.returncode or not wheels:
        pytest.skip(f"clip-retrieval could not be fetched from the package index: {r.stderr.strip()[-200:]}")
    source = zipfile.ZipFile(wheels[0]).read("clip_retrieval/clip_client.py").decode()
    namespace: dict = {"__name__": "clip_client"}
    exec(compile(source, "clip_retrieval/clip_client.py", "exec"), namespace)
    return namespace


def test_clip_retrieval_protocol_and_its_client(url, tmp_path):
    names = requests.get(f"{url}/indices-list", timeout=30).json()
    assert names == ["synthetic-tiny"]
    body = {"text": "two blue squares", "image": None, "image_url": None, "embedding_input": None,
            "modality": "image", "num_images": 10, "indice_name": names[0], "num_result_ids": 10, "use_mclip": False,
            "deduplicate": False, "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": 9,
            "aesthetic_weight": 0.5}  # every field ClipClient sends
    hits = post(url, body, "/knn-service")
    assert len(hits) == 10 and set(hits[0]) == {"id", "similarity", "url", "caption"}
    assert requests.get(hits[0]["url"], timeout=30).status_code == 200
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    fourth = post(url, {"ids": [hits[3]["id"]]}, "/metadata")[0]["metadata"]["uri"]
    only = post(url, {**body, "where": {"uri_prefix": fourth}}, "/knn-service")  # this server's filter, as in /search
    assert [h["id"] for h in only] == [hits[3]["id"]]
    r = requests.post(f"{url}/knn-service", json={**body, "where": {"colour": "blue"}}, timeout=30)
    assert r.status_code == 422 and "colour" in r.text
    meta = post(url, {"ids": [hits[0]["id"]], "indice_name": names[0]}, "/metadata")
    assert meta[0]["id"] == hits[0]["id"] and meta[0]["metadata"]["url"] == hits[0]["url"]
    r = requests.post(f"{url}/knn-service", json={**body, "text": None, "image_url": "http://example.com/a.jpg"},
                      timeout=30)
    assert r.status_code == 422 and "fetches nothing" in r.json()["error"]
    client = clip_client_module(tmp_path)
    # deduplicate=False: the tiny test ladder embeds many images within clip-retrieval's 0.94 of each other
    c = client["ClipClient"](url=f"{url}/knn-service", indice_name=names[0], num_images=5, deduplicate=False)
    text_hits = c.query(text="two blue squares")
    assert len(text_hits) == 5 and {"id", "similarity", "url"} <= set(text_hits[0])
    image = tmp_path / "q.png"
    image.write_bytes(requests.get(hits[0]["url"], timeout=30).content)
    assert c.query(image=str(image))[0]["id"] == hits[0]["id"]
