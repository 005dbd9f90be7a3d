"""`bicascade verify` on a database broken on purpose: each invariant is detected, `--repair` restores it, and a
healthy database passes; cache rows past their limit are evicted least recently hit first."""
import json
import time

import numpy as np
import pyarrow as pa
import pytest

from bicascade.storage import cache, tables, verify

from conftest import cli


def unit(rng, n, dim=8):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def emb_rows(ids, vectors, schema):
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vectors, np.float32).ravel()), vectors.shape[1])
    cols = [pa.array(ids, pa.string()), vec]
    if "hits" in schema.names:
        cols += [pa.array([0.0] * len(ids)), pa.array([0] * len(ids), pa.int64())]
    return pa.Table.from_arrays(cols, schema=schema)


@pytest.fixture
def db(tmp_path):
    """A small healthy database: 20 images, level 0 over all of them, a cache of 5."""
    rng = np.random.default_rng(0)
    d = tables.Database(str(tmp_path / "db"))
    ids = [f"{i:032x}" for i in range(20)]
    d.insert_new(tables.IMAGES, tables.IMAGES_SCHEMA, pa.Table.from_pylist(
        [{"id": i, "uri": f"/x/{i}.png", "bytes": b"", "width": 1, "height": 1, "caption": None, "meta": None}
         for i in ids], tables.IMAGES_SCHEMA))
    d.table(tables.emb_table("l0"), tables.emb_schema(8)).add(emb_rows(ids, unit(rng, 20), tables.emb_schema(8)))
    d.table(tables.emb_table("l1"), tables.cache_schema(8)).add(emb_rows(ids[:5], unit(rng, 5), tables.cache_schema(8)))
    d.append(tables.SOURCES, tables.SOURCES_SCHEMA, [{"uri": f"/x/{i}.png", "id": i} for i in ids])
    return d, ids


def test_a_healthy_database_passes(db):
    d, _ = db
    report = verify.verify(d, ["l0", "l1"])
    assert report.ok and report.problems == [] and [t.rows for t in report.tables] == [20, 20, 5, 20]


def test_each_broken_invariant_is_found_and_repaired(db):
    d, ids = db
    rng = np.random.default_rng(1)
    cache_schema = tables.cache_schema(8)
    broken = unit(rng, 3)
    broken[0] *= 3  # not of unit norm
    broken[1] = 0  # no direction at all (LanceDB itself refuses NaN on add)
    d.table(tables.emb_table("l1")).add(emb_rows([ids[0], ids[6], ids[7]], broken, cache_schema))  # ids[0] twice
    d.table(tables.emb_table("l1")).add(emb_rows(["f" * 32], unit(rng, 1), cache_schema))  # not in images
    d.table(tables.emb_table("l0")).delete(f"id = '{ids[19]}'")  # an image without a level-0 vector
    d.append(tables.SOURCES, tables.SOURCES_SCHEMA, [{"uri": "/gone.png", "id": "e" * 32}])
    report = verify.verify(d, ["l0", "l1"])
    assert not report.ok
    text = "\n".join(report.problems)
    for what in ("1 duplicate ids", "2 broken vectors", "1 ids not in images", "1 images without a level-0 vector"):
        assert what in text, text
    assert f"{tables.SOURCES}: 1 ids not in images" in text
    verify.verify(d, ["l0", "l1"], repair=True)
    after = verify.verify(d, ["l0", "l1"])
    assert after.problems == ["emb_l0: 1 images without a level-0 vector"]  # re-embedded by the next index run
    cached = d.column(tables.emb_table("l1"), "id")
    assert sorted(cached) == sorted(ids[:5] + [ids[7]])  # one valid copy of ids[0]; ids[6]'s zero vector dropped


def test_the_command_exits_1_with_a_report(db):
    d, ids = db
    d.record_ladder([{"level": 0, "ladder": "t", "model": json.dumps({"name": "m", "arch": "bc-tiny-s", "seed": 0}),
                      "fingerprint": "l0", "dim": 8}])
    d.table(tables.emb_table("l0")).add(emb_rows([ids[3]], unit(np.random.default_rng(2), 1), tables.emb_schema(8)))
    r = cli("verify", "--db", d.uri, "--json", check=False)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert not doc["ok"] and any("duplicate" in p for p in doc["problems"])
    fixed = cli("verify", "--db", d.uri, "--repair", "--json", check=False)
    assert fixed.returncode == 1 or json.loads(fixed.stdout)["ok"]  # the fingerprint check may still complain
    assert not any("duplicate" in p for p in json.loads(fixed.stdout)["problems"])


def test_caches_evict_the_least_recently_hit_rows(tmp_path):
    d = tables.Database(str(tmp_path / "db"))
    store = cache.LevelCache(d, "c", 8, flush_rows=1000, flush_s=3600, max_rows=10)
    rng = np.random.default_rng(0)
    ids = [f"{i:032x}" for i in range(10)]
    store.put(ids, unit(rng, 10))
    store.flush()
    time.sleep(0.05)
    store.get(ids[:3])  # hit these: they must survive
    store.apply_hits()
    assert store.recent(60) == 10
    store.put([f"{i:032x}" for i in range(10, 14)], unit(rng, 4))
    store.flush()  # 14 rows > 10: evict down to 9, the least recently hit first
    kept = set(d.column(tables.emb_table("c"), "id"))
    assert len(kept) == 9 and set(ids[:3]) <= kept
    hits = dict(zip(*[d.dataset(tables.emb_table("c")).to_table(columns=["id", "hits"]).column(c).to_pylist()
                      for c in ("id", "hits")]))
    assert all(hits[i] == 1 for i in ids[:3])


def test_the_resume_ledger_settles_errors_but_not_warnings(tmp_path):
    """A file that failed is not retried by the next run; one indexed with a warning (a broken EXIF block) is still
    embedded by another level 0 (`index --ladder` with a new corpus table, `migrate`)."""
    d = tables.Database(str(tmp_path / "db"))
    d.append(tables.ERRORS, tables.ERRORS_SCHEMA, [
        {"uri": "/x/bad.jpg", "stage": "decode", "error": "truncated", "run": "r"},
        {"uri": "/x/exif.jpg", "stage": tables.WARNING_STAGE, "error": "malformed EXIF", "run": "r"}])
    assert d.done_uris(set()) == {"/x/bad.jpg"}
    d.append(tables.SOURCES, tables.SOURCES_SCHEMA, [{"uri": "/x/exif.jpg", "id": "e" * 32}])
    assert d.done_uris({"e" * 32}) == {"/x/bad.jpg", "/x/exif.jpg"} and d.done_uris(set()) == {"/x/bad.jpg"}
