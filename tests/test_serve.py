"""The cascade served through real Ray Serve over HTTP on 127.0.0.1, against the in-process search on a tiny ladder."""
import concurrent.futures as cf
import json

import pytest
import requests
from ray import serve

import bicascade
from bicascade import models, query
from bicascade.actors.router import writer_name
from bicascade.serve.app import AppConfig
from bicascade.serve.schema import MAX_BODY_BYTES, MAX_UPLOAD_B64
from bicascade.storage import tables

from conftest import verified

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
QUERIES = ["a red circle", "two blue squares side by side", "a small green star above a striped triangle"]


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares one cache and one db
    yield


@pytest.fixture(scope="module")
def corpus(tiny_db):
    return tiny_db


@pytest.fixture(scope="module")
def local_results(corpus):
    """The in-process cascade, before the server starts (then exactly one writer per cache table at a time)."""
    with bicascade.open(corpus, device="cpu") as photos:
        return {q: photos.search(q, k=10).to_json() for q in QUERIES}


@pytest.fixture(scope="module")
def url(corpus, local_results, in_process_server):
    return in_process_server(AppConfig(db=corpus, group_gflops=0))  # a deployment per level, as real levels get


def post(url, body, **kw):
    return requests.post(f"{url}/search", json=body, timeout=120, **kw)


def encoded(level: int) -> int:
    return serve.get_deployment_handle(f"Encoder{level}", "bicascade").info.remote().result()["encoded"]


def test_http_equals_in_process_search(local_results, url):
    for q, want in local_results.items():
        got = post(url, {"query": q, "k": 10}).json()
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]
        assert [r["score"] for r in got["results"]] == pytest.approx([r["score"] for r in want["results"]], abs=1e-4)
        assert all(r["uri"].endswith(".jpg") or r["uri"].endswith(".png") for r in got["results"])


def test_repeated_query_hits_the_cache(url):
    q = {"query": "a large yellow hexagon", "k": 5}
    first = post(url, q).json()["stats"]["levels"]
    assert [lv["candidates"] for lv in first] == [50, 50, 14]
    again = post(url, q).json()
    for lv in again["stats"]["levels"][1:]:
        assert lv["cache_hits"] == lv["candidates"] and lv["encoded"] == 0
    assert again["stats"]["gflops"] == 0
    assert all(all(step["cached"] for step in r["levels"][1:]) for r in again["results"])


def test_level0_alone_on_request(url):
    out = post(url, {"query": "a red circle", "k": 50, "levels": 1}).json()
    assert len(out["results"]) == 50 and [lv["candidates"] for lv in out["stats"]["levels"]] == [50]
    two = post(url, {"query": "a red circle", "k": 10, "depth": 2}).json()  # `levels`, above, is its alias
    assert [lv["candidates"] for lv in two["stats"]["levels"]] == [50, 50]
    # a k beyond the last cutoff: the full cascade returns what its top level ranked
    assert len(post(url, {"query": "a red circle", "k": 40}).json()["results"]) == 14


def cached_ids(db: str, level: int) -> set[str]:
    info = query.open_ladder(tables.Database(db), None).levels[level]
    return tables.Database(db).ids(tables.emb_table(info.fingerprint))


def test_concurrent_identical_cold_queries_encode_once(url, corpus):
    """8 clients send one query none of whose candidates is cached yet: each level encodes each candidate once."""
    serve.get_app_handle("bicascade").options(method_name="flush").remote().result()
    text = "three purple crosses in a column"
    ladder = query.open_ladder(tables.Database(corpus), None)
    level0 = models.load_model(ladder.levels[0].spec, device="cpu")
    db = tables.Database(corpus)
    top50, _ = db.search(ladder.levels[0].fingerprint, level0.encode_texts([text])[0], 50)
    uncached = [i for i in top50 if i not in cached_ids(corpus, 1)]
    assert uncached, "the test needs a query whose level-1 candidates are not cached yet"
    before = [encoded(j) for j in (1, 2)]
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: post(url, {"query": text, "k": 10}), range(8)))
    assert all(r.status_code == 200 for r in outs)
    assert len({json.dumps([x["id"] for x in r.json()["results"]]) for r in outs}) == 1
    spent = [encoded(j) - b for j, b in zip((1, 2), before)]
    # what the first answer found missing is exactly what was encoded, once, however many clients asked
    misses = [max(r.json()["stats"]["levels"][j]["encoded"] for r in outs) for j in (1, 2)]
    assert spent == misses and spent[0] == len(uncached)


@pytest.mark.parametrize("body, message", [
    ({}, "exactly one of"), ({"query": ""}, "query"), ({"query": "   "}, "query"), ({"query": "x" * 1001}, "query"),
    ({"query": "a", "k": 0}, "k"), ({"query": "a", "k": 51}, "k: must be at most the first cutoff 50"),
    ({"query": "a", "k": "5"}, "k"), ({"query": "a", "k": True}, "k"), ({"query": "a", "levels": 0}, "levels"),
    ({"query": "a", "levels": 4}, "depth: must be between 1 and 3"),
    ({"query": "a", "depth": 0}, "depth"), ({"query": 5}, "query"),
    ({"query": ["a"]}, "query"), ({"query": "a", "k": 2.5}, "k"), ({"query": "a", "x": 1}, "x"),
    ({"query": "a", "image_id": "0" * 32}, "exactly one of"), ({"image_id": "../../etc/passwd"}, "image_id"),
    ({"image": "bm90IGFuIGltYWdl"}, "image"), ({"image": "%%%%"}, "image"),
    ({"query": "a", "where": {"uri_prefix": "' OR '1'='1"}}, "uri_prefix"),
    ({"query": "a", "where": {"caption": "x'; DROP TABLE images; --"}}, "caption"),
    ({"query": "a", "where": {"meta": {"a') OR (1=1": "x"}}}, "meta"), ({"query": "a", "where": {"size": 3}}, "size"),
    ({"query": "a", "min_score": 2}, "min_score"), ({"query": "a", "dedup": "high"}, "dedup"),
])
def test_bad_requests_are_4xx_json(url, body, message):
    r = post(url, body)
    assert r.status_code == 422 and message in r.json()["error"], r.text
    assert "Field required" not in r.json()["error"], r.text  # the mistake made, not the other request shapes


def test_non_json_oversized_and_ids(url):
    r = requests.post(f"{url}/search", data="{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "error" in r.json()
    over = MAX_BODY_BYTES + MAX_UPLOAD_B64 + 1  # one byte more than a search with the largest upload may carry
    r = requests.post(f"{url}/search", data="x" * over, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    r = requests.post(f"{url}/ladder", data="x" * (MAX_BODY_BYTES + 1), timeout=30)  # other routes: 16 KiB
    assert r.status_code == 413
    for bad in ("..%2F..%2Fetc%2Fpasswd", "a.b", "%2e%2e"):
        r = requests.get(f"{url}/images/{bad}", timeout=30)
        assert 400 <= r.status_code < 500 and "error" in r.json()
    assert requests.get(f"{url}/images/{'0' * 32}", timeout=30).status_code == 404
    hit = post(url, {"query": "a red circle", "k": 1}).json()["results"][0]
    img = requests.get(f"{url}/images/{hit['id']}", timeout=30)
    assert img.status_code == 200 and img.headers["content-type"].startswith("image/")


def test_health_and_stats(url, corpus):
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"ok": True}
    serve.get_app_handle("bicascade").options(method_name="flush").remote().result()
    stats = requests.get(f"{url}/stats", timeout=30).json()
    assert stats["rows"] == 300 and stats["levels"][0]["coverage"] == 1.0 and stats["ladder"] == "synthetic-tiny"
    assert stats["replicas"] == {"Api": 1, "Encoder0": 1, "Encoder1": 1, "Encoder2": 1}
    assert 0 < stats["levels"][1]["coverage"] < 1 and stats["cost_ratio"] > 1
    # written back once per id, in the fingerprinted cache tables
    db = tables.Database(corpus)
    infos = query.open_ladder(db, None).levels
    for j, info in enumerate(infos[1:], start=1):
        ids = db.column(tables.emb_table(info.fingerprint), "id")
        assert len(ids) == len(set(ids)) == stats["levels"][j]["cached"]


def test_an_image_deleted_over_http_is_gone_from_every_table_and_every_answer(url, corpus):
    found = post(url, {"query": "two red circles", "k": 5}).json()["results"]
    victim = found[0]["id"]
    r = requests.delete(f"{url}/images/{victim}", timeout=60)
    assert r.status_code == 200, r.text
    removed = r.json()["removed"]
    assert removed[tables.IMAGES] == 1 and sum(removed.values()) >= 3  # images, sources, level 0 (+ caches)
    again = post(url, {"query": "two red circles", "k": 5}).json()["results"]
    assert victim not in [x["id"] for x in again] and [x["id"] for x in again[:4]] == [x["id"] for x in found[1:5]]
    assert requests.get(f"{url}/images/{victim}", timeout=30).status_code == 404
    assert post(url, {"image_id": victim}).status_code == 404
    assert requests.delete(f"{url}/images/{victim}", timeout=30).status_code == 404
    assert requests.delete(f"{url}/images/..%2Fetc", timeout=30).status_code in (404, 422)
    serve.get_app_handle("bicascade").options(method_name="flush").remote().result()
    db = tables.Database(corpus)
    assert all(victim not in db.ids(n) for n in db.names() if n.startswith("emb_") or n == tables.IMAGES)
    verified(corpus)


def test_config_yaml_is_a_valid_serve_config_for_the_app():
    from ray.serve.schema import ServeDeploySchema

    from bicascade.serve import app, config

    doc = ServeDeploySchema.model_validate(config.document())
    spec = doc.applications[0]
    assert spec.import_path == "bicascade.serve.build:app_builder"
    config = app.AppConfig(**spec.args)  # what app_builder is given
    assert config.rate > 0 and config.burst >= config.rate  # rate limits on, as an operator deploys it
    names = {d.name for d in spec.deployments}
    assert names == {"Api", "Encoder0", "Encoder1", "Encoder2"}
    for d in spec.deployments:
        scaling = dict(d.autoscaling_config)
        assert scaling["max_replicas"] > scaling["min_replicas"] >= 1
        assert d.max_queued_requests > 0 and d.ray_actor_options.num_cpus < 1  # fits on 2 cores


def test_killed_replicas_lose_nothing_acknowledged_and_the_app_recovers(url, corpus):
    """Runs last in this module: it kills the top level's cache writer and Encoder replica."""
    import ray

    app = serve.get_app_handle("bicascade").options(method_name="flush")
    top = query.open_ladder(tables.Database(corpus), None).levels[-1]
    db = tables.Database(corpus)
    app.remote().result()
    stored = db.ids(tables.emb_table(top.fingerprint))

    # the cache writer dies: Ray restarts it, flushed rows stay, and new embeddings still reach the table
    ray.kill(ray.get_actor(writer_name(corpus, top.fingerprint), namespace="bicascade"), no_restart=False)
    cold = [post(url, {"query": q, "k": 10}) for q in ("four yellow crosses", "a large striped ring at the top")]
    assert all(r.status_code == 200 for r in cold)
    fresh = sum(r.json()["stats"]["levels"][-1]["encoded"] for r in cold)
    assert fresh > 0
    app.remote().result()
    after = db.ids(tables.emb_table(top.fingerprint))
    assert stored <= after and len(after) >= len(stored) + 1

    # the top level's Encoder replica dies: searches meanwhile get 200 or a JSON 503 with Retry-After, never a
    # 500 or a hang, and Serve brings a new replica up without a restart of the app
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "Encoder2" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]))
    answers = []
    for i in range(60):
        r = post(url, {"query": f"{i % 4 + 1} green diamonds", "k": 5})
        answers.append(r)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.headers.get("Retry-After") == "1" and "retry" in r.json()["error"]
        elif i > 3 and all(a.status_code == 200 for a in answers[-3:]):
            break
    assert answers[-1].status_code == 200
