"""Model upgrades on a served database: a new top level gets its own cache table, warmed for exactly the images the
old top level had cached; the running server switches to the recorded ladder with no failed request; the old table
stays until `cache drop`; a new level 0 is a new corpus table built beside the old one."""
import threading
import time

import pytest
import requests
import torch

from bicascade import models, query
from bicascade.storage import tables, verify

from conftest import cli, cli_json, serving

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


def new_top(tmp_path, arch: str, seed: int) -> str:
    torch.manual_seed(seed)
    return str(models.save_checkpoint(models.create(arch), tmp_path / f"{arch}-{seed}.pt"))


def test_a_new_top_level_is_warmed_and_served_without_downtime(tiny_db, tmp_path):
    db = tables.Database(tiny_db)
    old = query.open_ladder(db, None)
    s, m = (lv.spec for lv in old.levels[:2])
    cli("ladders", "add", "upgraded", f"{s.arch}={s.checkpoint}", f"{m.arch}={m.checkpoint}",
        f"bc-tiny-l={new_top(tmp_path, 'bc-tiny-l', 7)}")
    with serving(tiny_db) as server:
        # the old top level caches some images, among them every one the stream below will touch, so the set the
        # migration warms is known before it starts
        for q in ("a red circle", "two blue squares", "a striped star", "a small green star"):
            requests.post(f"{server.url}/search", json={"query": q, "k": 5}, timeout=120).raise_for_status()
        time.sleep(5)  # flushed by age
        old_top = tables.emb_table(old.levels[-1].fingerprint)
        cached = db.ids(old_top)
        assert cached
        stop, statuses, ladders = threading.Event(), [], set()

        def stream() -> None:
            while not stop.is_set():
                r = requests.post(f"{server.url}/search", json={"query": "a small green star", "k": 5}, timeout=120)
                statuses.append(r.status_code)
                if r.ok:
                    ladders.add(r.json()["stats"]["levels"][-1]["model"])
                time.sleep(0.05)  # a steady stream that leaves the migration job some of the 2 cores
        t = threading.Thread(target=stream)
        t.start()
        report = cli_json("migrate", "--db", tiny_db, "--ladder", "upgraded", "--warm")
        deadline = time.monotonic() + 120
        while "upgraded/bc-tiny-l" not in ladders and time.monotonic() < deadline:
            time.sleep(1)
        stop.set()
        t.join(timeout=120)
        assert set(statuses) == {200} and "upgraded/bc-tiny-l" in ladders  # switched, nothing refused
    top = next(lv for lv in report["levels"] if lv["level"] == 2)
    assert top["action"] == "warmed" and top["embedded"] == len(cached)
    assert [lv["action"] for lv in report["levels"][:2]] == ["kept", "kept"]
    assert report["embedded"] == len(cached) < report["corpus"] == 300
    new = query.open_ladder(db, None)
    assert new.name == "upgraded" and db.ids(tables.emb_table(new.levels[-1].fingerprint)) >= cached
    assert db.has(old_top)  # the old cache stays ...
    assert cli_json("cache", "drop", "--db", tiny_db)["dropped"] == [old_top]  # ... until dropped
    report = verify.verify(db, [lv.fingerprint for lv in new.levels])
    assert report.ok, report.problems


def test_a_new_level_0_is_a_new_corpus_table(tiny_db, tmp_path):
    db = tables.Database(tiny_db)
    old = query.open_ladder(db, None)
    m, big = (lv.spec for lv in old.levels[1:])
    cli("ladders", "add", "new-level0", f"bc-tiny-s={new_top(tmp_path, 'bc-tiny-s', 3)}", f"{m.arch}={m.checkpoint}",
        f"{big.arch}={big.checkpoint}")
    report = cli_json("migrate", "--db", tiny_db, "--ladder", "new-level0")
    assert report["levels"][0]["action"] == "rebuilt" and report["levels"][0]["embedded"] == 300
    assert db.has(tables.emb_table(old.levels[0].fingerprint))  # built beside the old one
    new = query.open_ladder(db, None)
    assert db.count(tables.emb_table(new.levels[0].fingerprint)) == 300
    hits = cli_json("search", "a red circle", "--db", tiny_db, "--k", "3")
    assert [lv["model"] for lv in hits["stats"]["levels"]][0] == "new-level0/bc-tiny-s"
