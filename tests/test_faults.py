"""Faults injected into the real parts (Ray, Serve, LanceDB), each ending with `verify`: racing router replicas, a
cache writer and an index driver SIGKILLed mid-commit, compaction beside a busy writer, a database that turns
read-only under a server, and a live index update under a query stream."""
import concurrent.futures as cf
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from bicascade.storage import cache, tables, verify

from conftest import cli, cli_json, ray_logs, serving, verified

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
LADDER = "synthetic-tiny"


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


def copy_db(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_sixteen_clients_racing_through_three_ingress_replicas_write_each_id_once(tiny_db, tmp_path):
    db = copy_db(tiny_db, tmp_path / "db")
    queries = [f"{n} {c} crosses" for n in ("one", "two") for c in ("red", "blue", "green", "pink")]
    with serving(db, "--replicas", "Api=3") as server:
        def client(i: int) -> list[int]:
            return [requests.post(f"{server.url}/search", json={"query": q, "k": 10}, timeout=120).status_code
                    for q in queries[i % 4:] + queries[:i % 4]]  # the same cold queries, in another order each
        with cf.ThreadPoolExecutor(16) as pool:
            statuses = [s for c in pool.map(client, range(16)) for s in c]
        assert server.stop() == 0, server.stderr[-4000:]  # SIGTERM flushes every writer
    assert statuses == [200] * len(statuses)
    report = verified(db)
    caches = report.tables[2:4]
    assert all(t.rows > 0 and t.duplicate_ids == 0 for t in caches)
    print(f"{len(statuses)} requests, 0 non-200; cache rows {[t.rows for t in caches]}, one per id")


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from bicascade.storage import cache, tables
    store = cache.LevelCache(tables.Database(sys.argv[1]), "killed", 16, flush_rows=10**9, flush_s=10**9)
    rng = np.random.default_rng(0)
    for batch in range(10**6):
        ids = [f"{batch:08d}-{i:04d}" for i in range(200)]
        v = rng.normal(size=(200, 16)).astype(np.float32)
        store.put(ids, v / np.linalg.norm(v, axis=1, keepdims=True))
        store.flush()
        print(f"ack {batch}", flush=True)  # acknowledged: flush() returned
""")


def test_a_cache_writer_killed_mid_commit_loses_nothing_acknowledged(tmp_path):
    db = str(tmp_path / "db")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, db], stdout=subprocess.PIPE, text=True)
    acked = -1
    deadline = time.monotonic() + 120
    while acked < 25 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        acked = int(line.split()[1]) if line.startswith("ack") else acked
    time.sleep(0.137)  # into the next commit
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    acked = max([acked] + [int(line.split()[1]) for line in proc.stdout if line.startswith("ack")])
    d = tables.Database(db)
    ids = set(d.column(tables.emb_table("killed"), "id"))  # the table opens
    want = {f"{b:08d}-{i:04d}" for b in range(acked + 1) for i in range(200)}
    assert want <= ids and len(ids) % 200 == 0
    report = verify.check_embeddings(d, tables.emb_table("killed"), ids, level0=False, repair=False)
    assert report.problems == []
    print(f"{acked + 1} acknowledged commits kept, {len(ids)} rows, one per id")


def test_a_cache_writer_recycles_its_process_and_loses_nothing(tmp_path):
    """Past its memory budget (here: none, from the call after its first commit) a writer exits between two calls;
    Ray restarts it, the call that found it gone is retried on the new process, and every row lands once."""
    import ray

    from bicascade.actors.router import CacheWriter
    from bicascade.pipelines import runtime

    runtime.connect()
    try:
        db = str(tmp_path / "db")
        writer = CacheWriter.options(max_restarts=-1, max_task_retries=-1).remote(
            db, "recycled", 16, flush_rows=10, flush_s=3600, recycle_mb=0, warm_commits=1)
        rng = np.random.default_rng(0)
        pids, written = set(), []
        for batch in range(12):
            ids = [f"{batch:03d}-{i}" for i in range(10)]
            v = rng.normal(size=(10, 16)).astype(np.float32)
            ray.get(writer.put.remote(ids, v / np.linalg.norm(v, axis=1, keepdims=True)))  # a commit each
            ray.get(writer.hit.remote(dict.fromkeys(ids[:3], 1)))
            written += ids
            pids.add(ray.get(writer.pid.remote()))
        ray.get(writer.flush.remote())
    finally:
        ray.shutdown()
    d = tables.Database(db)
    ids = d.column(tables.emb_table("recycled"), "id")
    assert len(pids) >= 3
    assert sorted(ids) == sorted(written)  # every row once
    print(f"{len(written)} rows over {len(pids)} writer processes, one row per id")


def test_compaction_in_a_loop_beside_a_busy_writer_loses_no_row(tmp_path):
    d = tables.Database(str(tmp_path / "db"))
    store = cache.LevelCache(d, "busy", 16, flush_rows=10**9, flush_s=10**9)
    rng = np.random.default_rng(0)
    stop, errors = threading.Event(), []

    def compact() -> None:
        other = tables.Database(d.uri)  # another handle, as a maintenance job would have
        while not stop.is_set():
            try:
                other.compact(tables.emb_table("busy"))
            except Exception as e:  # a compaction preempted by a commit is retried; anything else is a failure
                errors.append(e)
    t = threading.Thread(target=compact)
    written = []
    for batch in range(40):
        ids = [f"{batch:04d}-{i:03d}" for i in range(50)]
        v = rng.normal(size=(50, 16)).astype(np.float32)
        store.put(ids, v / np.linalg.norm(v, axis=1, keepdims=True))
        store.flush()
        written += ids
        if batch == 0:  # the table exists: the maintenance job starts
            t.start()
    stop.set()
    t.join(timeout=120)
    assert errors == []
    ids = d.column(tables.emb_table("busy"), "id")
    assert sorted(ids) == sorted(written)
    print(json.dumps({"commits": 40, "rows_written": len(written), "rows": len(ids), "unique_ids": len(set(ids))}))


def test_an_index_driver_killed_in_its_final_compaction_reruns_to_exactly_once(tiny_db, tmp_path):
    from bicascade.pipelines.lab import train

    _, root = train.ensure_ladder(LADDER, with_world=True)
    db = str(tmp_path / "db")
    proc = subprocess.Popen([sys.executable, "-m", "bicascade.cli", "-v", "index", str(root / "test"), "--db", db,
                             "--ladder", LADDER, "--ann-min-rows", "256"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    for line in proc.stderr:
        if "compacting" in line:  # the job wrote every row; now it compacts and builds its indexes
            time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the kill should land in the final compaction"
    t0 = time.monotonic()
    again = cli_json("index", str(root / "test"), "--db", db, "--ann-min-rows", "256")
    rerun_s = time.monotonic() - t0
    assert again["rows"] == 300 and again["ann"] == "IVF_SQ"
    report = verified(db)
    assert report.tables[0].rows == 300 == report.tables[1].rows  # images and level 0: each image exactly once
    print(json.dumps({"images": 300, "rows_after_rerun": report.tables[1].rows,
                      "duplicate_ids": report.tables[1].duplicate_ids, "rerun_s": round(rerun_s, 1)}))


def mount_ro_capable(path) -> bool:
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(path)], capture_output=True)
    return ok.returncode == 0


def test_a_database_turned_read_only_keeps_answering(tiny_db, tmp_path):
    mnt = tmp_path / "mnt"
    if os.geteuid() != 0 or not mount_ro_capable(mnt):
        pytest.skip("making a folder read-only under root needs a mount: this machine refuses one")
    try:
        db = copy_db(tiny_db, mnt / "db")
        with serving(db) as server:
            warm = {"query": "a small striped star", "k": 5}
            assert requests.post(f"{server.url}/search", json=warm, timeout=120).status_code == 200
            requests.get(f"{server.url}/stats", timeout=60)
            time.sleep(5)  # the writers flush by age
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            statuses = [requests.post(f"{server.url}/search", json=warm, timeout=120).status_code]
            cold = [{"query": f"{n} large {c} rings", "k": 5} for n in ("one", "two", "three") for c in ("cyan", "red")]
            statuses += [requests.post(f"{server.url}/search", json=b, timeout=120).status_code for b in cold]
            time.sleep(6)  # the writers try, fail and say so
            statuses += [requests.post(f"{server.url}/search", json=b, timeout=120).status_code for b in cold]
            assert statuses == [200] * len(statuses)
            assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
            server.stop()
            print(json.dumps({"requests_after_ro": len(statuses), "non_200": 0, "server_exit": server.proc.returncode}))
        logs = ray_logs()
        assert "cache write to emb_" in logs and "failed" in logs
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def next_pass(watcher: subprocess.Popen, log, timeout: float = 240) -> dict:
    """`index --watch --json`'s next pass: its JSON line (other output skipped); fails with the watcher's log when
    it exits or stays silent."""
    import select

    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([watcher.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no pass within {timeout} s:\n{log.read_text()[-3000:]}"
        line = watcher.stdout.readline()
        assert line, f"the watcher exited {watcher.poll()}:\n{log.read_text()[-3000:]}"
        if line.startswith("{"):
            return json.loads(line)


def test_a_live_index_update_and_a_folder_sync_under_a_query_stream_fail_no_request(tiny_db, tmp_path):
    from bicascade.pipelines.lab import world

    db = copy_db(tiny_db, tmp_path / "db")
    extra = world.make_world(tmp_path / "extra", world.WorldConfig(seed=5, image_size=32, train=0, val=0, test=60))
    with serving(db) as server:
        stop, statuses = threading.Event(), []

        def stream() -> None:
            n = 0
            while not stop.is_set():
                body = {"query": f"{('one', 'two', 'three')[n % 3]} small {('red', 'blue')[n % 2]} stars", "k": 5}
                statuses.append(requests.post(f"{server.url}/search", json=body, timeout=120).status_code)
                n += 1
                time.sleep(0.05)  # a steady stream that leaves the index job some of the 2 cores
        t = threading.Thread(target=stream)
        t.start()
        t0 = time.monotonic()
        cli("index", str(extra / "test"), "--db", db)  # the database's own ladder
        indexed = time.monotonic()
        prefix = str(extra / "test")
        while time.monotonic() - indexed < 60:
            got = requests.post(f"{server.url}/search", json={"query": "a small red star", "k": 5,
                                                             "where": {"uri_prefix": prefix}}, timeout=120).json()
            if got["results"]:
                break
            time.sleep(0.5)
        delay = time.monotonic() - indexed
        assert got["results"] and all(r["uri"].startswith(prefix) for r in got["results"])
        assert delay <= 30, delay
        assert requests.get(f"{server.url}/stats", timeout=60).json()["rows"] == 360

        # the folder changes under the server and `index --watch` follows it: 10 files deleted and 5 rewritten with
        # new pixels before its first pass, 1 added after it (the second pass must see it)
        files = sorted((extra / "test").glob("*.jpg"))
        gone = files[:10]
        for f in gone:
            f.unlink()
        for f in files[10:15]:
            Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(f, quality=90)
            os.utime(f, (f.stat().st_atime, f.stat().st_mtime + 10))
        log = tmp_path / "watch.err"
        with open(log, "w") as err:
            watcher = subprocess.Popen([sys.executable, "-m", "bicascade.cli", "index", str(extra / "test"), "--db",
                                        db, "--watch", "4", "--json"], stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            synced = next_pass(watcher, log)
            Image.open(files[20]).rotate(90).save(extra / "test" / "new.jpg.tmp", "JPEG", quality=90)
            os.replace(extra / "test" / "new.jpg.tmp", extra / "test" / "new.jpg")  # whole, for the next pass
            added = next_pass(watcher, log)
        finally:
            watcher.send_signal(signal.SIGINT)
            try:
                watcher.communicate(timeout=120)
            except subprocess.TimeoutExpired:  # never left running behind the test
                watcher.kill()
                watcher.communicate()
        assert watcher.returncode == 0, log.read_text()[-2000:]
        assert (synced["gone"], synced["changed"], synced["removed"], synced["new_rows"]) == (10, 5, 15, 5), synced
        assert (added["gone"], added["changed"], added["removed"], added["new_rows"]) == (0, 0, 0, 1), added
        t1 = time.monotonic()
        while time.monotonic() - t1 < 60:
            rows = requests.get(f"{server.url}/stats", timeout=60).json()["rows"]
            found = requests.post(f"{server.url}/search", json={"query": "a small red star", "k": 14, "where": {
                "uri_prefix": str(files[0].parent)}}, timeout=120).json()["results"]
            if rows == 351 and not {r["uri"] for r in found} & {str(f) for f in gone}:
                break
            time.sleep(0.5)
        seen = time.monotonic() - t1
        stop.set()
        t.join(timeout=120)
        assert rows == 351 and seen <= 30, (rows, seen)
        assert statuses and set(statuses) == {200}, {c: statuses.count(c) for c in set(statuses)}
        print(json.dumps({"requests": len(statuses), "non_200": 0, "index_s": round(indexed - t0, 1),
                          "searchable_after_s": round(delay, 1), "sync": {k: synced[k] + added[k] for k in (
                              "gone", "changed", "removed", "new_rows")}, "sync_seen_after_s": round(seen, 1)}))
    verified(db)
