"""The level caches: the LRU front bounded in bytes, pending rows readable until written, one encoding per id for
concurrent misses, and write-back that never writes an id twice."""
import threading
import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from bicascade.errors import NotIndexedError
from bicascade.storage import cache, tables


def vec(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1
    return v


def test_the_front_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    front = cache.LruVectors(max_bytes=10 * 32)  # ten vectors of 8 floats
    front.put({f"i{n}": vec(n) for n in range(10)})
    front.get(["i0"])  # i0 is now the most recently used
    front.put({"new": vec(3)})
    assert len(front) == 10 and front.bytes <= 320
    assert "i1" not in front.items and "i0" in front.items and "new" in front.items


def test_a_row_of_a_batch_does_not_keep_the_batch_alive():
    """The bound counts each vector's bytes, so a row must not be a view that pins the batch it came in."""
    batch = np.ones((1000, 8), np.float32)
    front = cache.LruVectors(max_bytes=10 * 32)
    front.put({"a": batch[0]})
    stored = front.items["a"]
    assert stored.base is None and stored.nbytes == 32 and np.array_equal(stored, batch[0])


def test_pending_rows_stay_readable_whatever_the_front_evicts(tmp_path):
    store = cache.LevelCache(tables.Database(str(tmp_path)), "fp", 8, flush_rows=1000, flush_s=3600, front_bytes=64)
    store.put([f"i{n}" for n in range(20)], np.stack([vec(n) for n in range(20)]))
    assert len(store.memory) <= 2 and len(store.get([f"i{n}" for n in range(20)])) == 20
    assert store.flush() == 20 and store.rows() == 20 and store.flush() == 0
    store.put(["i0", "i1"], np.stack([vec(0), vec(1)]))  # already stored: merge_insert keeps one row per id
    store.flush()
    ids = store.db.column(tables.emb_table("fp"), "id")
    assert len(ids) == len(set(ids)) == 20


def stored(tmp_path, n: int) -> tuple[tables.Database, cache.LevelCache, list[str]]:
    """A cache table holding n committed rows, and a store that batches hit counts until told to apply them."""
    db = tables.Database(str(tmp_path))
    store = cache.LevelCache(db, "fp", 8, flush_rows=1000, flush_s=3600)
    ids = [f"i{k}" for k in range(n)]
    store.put(ids, np.stack([vec(k) for k in range(n)]))
    store.flush()
    return db, store, ids


def test_hit_counts_land_per_id_in_one_commit_and_a_warm_stream_does_not_fragment_the_table(tmp_path, monkeypatch):
    """A warm stream writes only hit counts: one commit per batch of them, whatever the counts, and compaction on
    commits of any kind, not only on new rows."""
    monkeypatch.setattr(cache, "COMPACT_EVERY", 5)  # the cadence, not its value, is under test (and fast)
    db, store, ids = stored(tmp_path, 30)
    for _ in range(3 * cache.COMPACT_EVERY):
        for n, i in enumerate(ids):
            store.hit({i: n % 4 + 1})  # four distinct counts in every round
        version = db.version(store.name)
        store.apply_hits()
        if store.commits:  # no compaction this round
            assert db.version(store.name) == version + 1
    got = db.dataset(store.name).to_table(columns=["id", "hits"]).to_pydict()
    hits = dict(zip(got["id"], got["hits"]))
    assert hits == {i: 3 * cache.COMPACT_EVERY * (n % 4 + 1) for n, i in enumerate(ids)}
    assert len(db.dataset(store.name).get_fragments()) <= cache.COMPACT_EVERY


def test_compaction_drops_old_versions_so_a_long_stream_does_not_pile_them_up(tmp_path, monkeypatch):
    """Every hit-count commit is a version on disk; compaction removes those older than KEEP_VERSIONS (here: all but
    the latest), and the data survives it."""
    monkeypatch.setattr(tables, "KEEP_VERSIONS", timedelta(0))
    monkeypatch.setattr(cache, "COMPACT_EVERY", 5)
    db, store, ids = stored(tmp_path, 10)
    for _ in range(2 * cache.COMPACT_EVERY):
        store.hit(dict.fromkeys(ids, 1))
        store.apply_hits()
    kept = len(db.table(store.name).list_versions())
    assert kept <= cache.COMPACT_EVERY + 2, kept  # without the cleanup: over 2 x COMPACT_EVERY
    got = db.dataset(store.name).to_table(columns=["id", "hits"]).to_pydict()
    assert dict(zip(got["id"], got["hits"])) == dict.fromkeys(ids, 2 * cache.COMPACT_EVERY)


def test_concurrent_misses_of_one_id_encode_it_once(tmp_path):
    store = cache.LevelCache(tables.Database(str(tmp_path)), "fp", 8, flush_rows=1000, flush_s=3600)
    inflight = cache.InFlight(store)
    calls: list[list[str]] = []

    def encode(ids):
        calls.append(list(ids))
        time.sleep(0.05)
        return np.stack([vec(int(i[1:])) for i in ids])

    start = threading.Barrier(8)
    results = []

    def query(n: int) -> None:
        start.wait()
        results.append(inflight.encode([f"i{k}" for k in range(n, n + 6)], encode))
    threads = [threading.Thread(target=query, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for c in calls for i in c]
    assert len(flat) == len(set(flat)) == 13  # ids i0..i12, each encoded once
    # a query that missed before the first one finished, and asks after: it finds the result, encodes nothing
    before = len(calls)
    again = inflight.encode(["i0", "i12"], encode)
    assert len(calls) == before and np.array_equal(again, np.stack([vec(0), vec(12)]))


def corpus_table(tmp_path, n=200, dim=8, seed=0):
    d = tables.Database(str(tmp_path / "db"))
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"{i:032x}" for i in range(n)]
    schema = tables.emb_schema(dim)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)
    d.table(tables.emb_table("l0"), schema).add(pa.Table.from_arrays([pa.array(ids), vec], schema=schema))
    return d, ids, v


def test_the_corpus_in_memory_and_in_the_table_agree_and_follow_new_rows(tmp_path):
    d, ids, v = corpus_table(tmp_path)
    memory, table = cache.Corpus(d, "l0"), cache.Corpus(d, "l0", memory_bytes=0)
    assert memory.in_memory and not table.in_memory
    q = v[7]
    assert memory.search(q, 10)[0] == table.search(q, 10)[0] and memory.search(q, 10)[0][0] == ids[7]
    allowed = ids[100:110]
    got = memory.search(q, 5, memory.allow(allowed))[0]
    assert set(got) <= set(allowed) and len(got) == 5
    assert table.search(q, 5, table.allow(allowed))[0] == got
    new = np.zeros((1, 8), np.float32)
    new[0, 0] = 1
    schema = tables.emb_schema(8)
    d.table(tables.emb_table("l0")).add(pa.Table.from_arrays(
        [pa.array(["f" * 32]), pa.FixedSizeListArray.from_arrays(pa.array(new.ravel()), 8)], schema=schema))
    assert memory.search(new[0], 1)[0] != ["f" * 32]  # the snapshot until refreshed
    assert memory.refresh() and memory.rows == 201 and memory.search(new[0], 1)[0] == ["f" * 32]
    assert not memory.refresh()  # nothing new since


def test_replacing_a_vector_counts_its_bytes_once():
    front = cache.LruVectors(max_bytes=3 * 32)
    front.put({"a": vec(0), "b": vec(1)})
    front.put({"a": vec(2)})  # same id, same size: nothing grows, nothing is dropped
    assert front.bytes == 64 and list(front.items) == ["b", "a"] and np.array_equal(front.items["a"], vec(2))
    front.put({"c": vec(3), "d": vec(4)})  # four vectors over a bound of three: the least recently used goes
    assert front.bytes == 96 and list(front.items) == ["a", "c", "d"]
    assert cache.LruVectors().max_bytes == 64 << 20 and cache.LruVectors().bytes == 0


def test_a_batch_is_written_at_flush_rows_or_when_its_oldest_row_is_flush_s_old(tmp_path):
    db = tables.Database(str(tmp_path))
    store = cache.LevelCache(db, "fp", 8, flush_rows=3, flush_s=3600)
    assert (store.commits, store.lifetime_commits, store.pending) == (0, 0, {})
    store.put(["a", "b"], np.stack([vec(0), vec(1)]))
    assert len(store.pending) == 2 and not db.has(store.name)  # one short of flush_rows, and young
    store.put(["c"], np.stack([vec(2)]))
    assert store.pending == {} and store.rows() == 3 and store.commits == 1 == store.lifetime_commits
    aged = cache.LevelCache(db, "fp2", 8, flush_rows=1000, flush_s=0.2)
    aged.put(["a"], np.stack([vec(0)]))
    assert len(aged.pending) == 1
    time.sleep(0.25)
    aged.maybe_flush()
    assert aged.pending == {} and aged.rows() == 1
    aged.maybe_flush()  # nothing pending: no empty commit however old the last flush
    assert aged.lifetime_commits == 1
    default = cache.LevelCache(db, "fp3", 8)
    assert (default.flush_rows, default.flush_s, default.memory.max_bytes) == (256, 5.0, cache.DEFAULT_FRONT_BYTES)


def test_compaction_runs_every_compact_every_commits_of_any_kind(tmp_path, monkeypatch):
    assert cache.COMPACT_EVERY == 20
    monkeypatch.setattr(cache, "COMPACT_EVERY", 4)
    db, store, ids = stored(tmp_path, 4)  # one commit so far
    compactions = []
    monkeypatch.setattr(db, "finish", lambda names: compactions.append(list(names)))
    for n in range(2, 2 * cache.COMPACT_EVERY + 2):
        store.hit({ids[0]: 1})
        assert store.apply_hits() == 1
        assert store.lifetime_commits == n and store.commits == n % cache.COMPACT_EVERY
        assert len(compactions) == n // cache.COMPACT_EVERY
    assert compactions == [[store.name]] * 2


def test_reads_count_one_hit_per_found_id_and_nothing_for_a_miss(tmp_path):
    db, store, ids = stored(tmp_path, 4)
    sunk = []
    reader = cache.LevelCache(db, "fp", 8, hit_sink=sunk.append)  # a second process: nothing in its front
    got = reader.get(["i0", "i1", "nope"])
    assert set(got) == {"i0", "i1"} and np.array_equal(got["i1"], vec(1)) and sunk == [{"i0": 1, "i1": 1}]
    assert set(reader.memory.items) == {"i0", "i1"}  # read through into the front
    reader.get(["nope"])
    assert len(sunk) == 1
    assert set(reader.remembered_or_stored(["i2", "i0", "nope"])) == {"i0", "i2"} and len(sunk) == 1
    assert "i2" not in reader.memory.items  # a look that is not a query's remembers nothing
    store.hit({"i0": 2})
    store.hit({"i0": 3, "i3": 1})
    assert store.hits["i0"][0] == 5 and store.apply_hits() == 2
    got = db.take(store.name, ["i0", "i3", "i1"], ["id", "hits"]).to_pydict()
    assert dict(zip(got["id"], got["hits"])) == {"i0": 5, "i3": 1, "i1": 0}
    assert store.apply_hits() == 0  # nothing counted since


def test_a_cache_table_from_before_hit_counts_gets_its_columns_and_counts_from_zero(tmp_path):
    db = tables.Database(str(tmp_path))
    schema = tables.emb_schema(8)
    db.table(tables.emb_table("old"), schema).add(pa.Table.from_arrays(
        [pa.array(["a", "b"]), pa.FixedSizeListArray.from_arrays(pa.array(np.stack([vec(0), vec(1)]).ravel()), 8)],
        schema=schema))
    store = cache.LevelCache(db, "old", 8)
    assert store.recent(3600) == 0  # no last_hit column yet
    store.hit({"a": 2})
    assert store.apply_hits() == 1
    got = db.take(store.name, ["a", "b"], ["id", "hits"]).to_pydict()
    assert dict(zip(got["id"], got["hits"])) == {"a": 2, "b": None} and store.recent(3600) == 1


def test_hits_before_the_table_exists_are_dropped_and_a_sink_store_writes_nothing(tmp_path):
    db = tables.Database(str(tmp_path))
    sunk = []
    store = cache.LevelCache(db, "fp", 8, sink=lambda ids, v: sunk.append((ids, v.shape)))
    store.hit({"a": 1})
    assert store.apply_hits() == 0 and store.hits == {}
    store.put(["a", "b"], np.stack([vec(0), vec(1)]))
    assert sunk == [(["a", "b"], (2, 8))] and store.pending == {} and set(store.remembered(["a", "b"])) == {"a", "b"}
    assert not db.has(store.name)


def test_eviction_past_max_rows_drops_the_least_recently_hit_down_to_ninety_percent(tmp_path):
    db, writer, ids = stored(tmp_path, 2100)
    hot = ids[-150:]  # hit after the insert: the most recently used, they stay
    writer.hit(dict.fromkeys(hot, 1))
    writer.apply_hits()
    store = cache.LevelCache(db, "fp", 8, max_rows=2000)
    store.remember({"i0": vec(0)})
    assert writer.evict() == 0 and store.lifetime_commits == 0  # no bound
    assert store.evict() == 2100 - 1800 and store.rows() == 1800
    assert store.lifetime_commits == 1 and len(store.memory) == 0  # one batch of deletes; the front forgets
    left = set(db.column(store.name, "id"))
    assert set(hot) <= left and len(left) == 1800 and "i0" not in left
    assert store.evict() == 0 and store.rows() == 1800  # at or under the bound: nothing more
    store.max_rows = 1800
    assert store.evict() == 0
    assert cache.LevelCache(db, "nothing", 8, max_rows=1).evict() == 0


def test_eviction_deletes_in_batches_of_a_thousand_and_a_flush_evicts(tmp_path):
    db = tables.Database(str(tmp_path))
    store = cache.LevelCache(db, "fp", 8, flush_rows=10_000, flush_s=3600, max_rows=1000)
    store.put([f"i{k}" for k in range(3001)], np.zeros((3001, 8), np.float32))
    assert store.flush() == 3001 and store.lifetime_commits == 1 + 3 and store.rows() == 900


def test_recent_counts_rows_hit_or_added_within_the_window(tmp_path):
    db, store, ids = stored(tmp_path, 6)
    assert store.recent(3600) == 6  # just added
    old = time.time() - 7200
    store.db.table(store.name).merge_insert("id").when_matched_update_all().execute(
        pa.table({"id": pa.array(ids[:4]), "last_hit": pa.array([old] * 4, pa.float64())}))
    assert store.recent(3600) == 2 and store.recent(10_000) == 6 and store.recent(0.0) == 0
    assert cache.LevelCache(db, "other", 8).recent(3600) == 0  # no table


def test_inflight_failure_reaches_every_waiter_and_the_next_ask_encodes_again(tmp_path):
    store = cache.LevelCache(tables.Database(str(tmp_path)), "fp", 8, flush_rows=1000, flush_s=3600)
    inflight = cache.InFlight(store)
    started, release = threading.Event(), threading.Event()

    def failing(ids):
        started.set()
        release.wait(5)
        raise RuntimeError("encoder died")

    errors = []

    def first():
        try:
            inflight.encode(["a", "b"], failing)
        except RuntimeError as e:
            errors.append(str(e))
    t = threading.Thread(target=first)
    t.start()
    started.wait(5)

    def second():  # asks for "b" while the first encodes it: waits for that result, encodes nothing itself
        try:
            inflight.encode(["b"], lambda ids: 1 / 0)
        except RuntimeError as e:
            errors.append(str(e))
    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.05)
    release.set()
    t.join()
    waiter.join()
    assert errors == ["encoder died", "encoder died"] and inflight.pending == {}
    got = inflight.encode(["a", "b"], lambda ids: np.stack([vec(0), vec(1)]))
    assert np.array_equal(got, np.stack([vec(0), vec(1)]))


def test_the_corpus_out_of_memory_filters_exactly_or_widens_the_ann_until_m_allowed(tmp_path, monkeypatch):
    d, ids, v = corpus_table(tmp_path, n=300)
    memory = cache.Corpus(d, "l0")
    q = v[0]
    ranked = memory.search(q, 300)[0]
    allowed = ranked[-40:]  # the 40 worst: the ANN's first 4m never holds them
    want = memory.search(q, 10, memory.allow(allowed))
    exact = cache.Corpus(d, "l0", memory_bytes=0)
    widened = cache.Corpus(d, "l0", memory_bytes=0, exact_max_allowed=39)
    assert exact.exact_max_allowed == 20_000 and exact.search(q, 10, exact.allow(allowed))[0] == want[0]
    asked = []
    real = d.search

    def search(fp, vector, m, params=None):
        asked.append(m)
        return real(fp, vector, m, params)
    monkeypatch.setattr(d, "search", search)
    got, scores = widened.search(q, 10, widened.allow(allowed))
    assert got == want[0] and np.allclose(scores, want[1], atol=1e-5) and asked == [40, 160, 640]
    asked.clear()
    assert widened.search(q, 10, widened.allow(allowed[:39]))[0] == want[0][:10] and asked == []  # exact: 39 allowed
    none = exact.search(q, 10, ["not-an-id"])
    assert none[0] == [] and none[1].shape == (0,)
    assert np.array_equal(exact.vectors(ids[3:6]), v[3:6]) and np.array_equal(memory.vectors(ids[3:6]), v[3:6])


def test_the_corpus_is_in_memory_up_to_its_byte_bound_and_an_old_mask_keeps_meaning_what_it_said(tmp_path):
    d, ids, v = corpus_table(tmp_path, n=50)
    assert cache.Corpus(d, "l0", memory_bytes=50 * 8 * 4).in_memory
    assert not cache.Corpus(d, "l0", memory_bytes=50 * 8 * 4 - 1).in_memory
    with pytest.raises(NotIndexedError, match="bicascade index"):
        cache.Corpus(d, "nope")
    corpus = cache.Corpus(d, "l0")
    assert corpus.rows == 50 and corpus.version == d.version(corpus.name)
    mask = corpus.allow(ids[:5] + ["unknown"])
    assert mask.sum() == 5 and len(mask) == 50
    new = np.asarray(v[0], np.float32)[None]  # a copy of row 0: it would rank first if the old mask let it
    schema = tables.emb_schema(8)
    d.table(tables.emb_table("l0")).add(pa.Table.from_arrays(
        [pa.array(["f" * 32]), pa.FixedSizeListArray.from_arrays(pa.array(new.ravel()), 8)], schema=schema))
    assert corpus.refresh() and corpus.rows == 51
    got = corpus.search(v[0], 5, mask)[0]
    assert set(got) == set(ids[:5])  # the new row is not in the mask made before it
