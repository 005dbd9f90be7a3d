"""`bicascade serve` as a user runs it: a subprocess with its own Ray cluster, stopped by SIGTERM."""
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
LADDER = "synthetic-tiny"


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


def test_serve_command_stops_cleanly_and_the_cache_survives_a_restart(tiny_db, free_port, wait_healthy, serve_command):
    corpus = tiny_db
    q = {"query": "two small orange diamonds in a row", "k": 5}
    runs = []
    for _ in range(2):
        port = free_port()
        proc = serve_command(corpus, LADDER, port)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc)
            runs.append(requests.post(f"{url}/search", json=q, timeout=120).json()["stats"]["levels"])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
            assert f"serving {corpus} on {url}" in proc.stderr.read()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(2)
        with pytest.raises(ProcessLookupError):  # no raylet, GCS or worker left in its process group
            os.killpg(proc.pid, 0)
    assert sum(lv["encoded"] for lv in runs[0][1:]) > 0
    assert all(lv["cache_hits"] == lv["candidates"] and lv["encoded"] == 0 for lv in runs[1][1:])


def test_search_command_in_process(tiny_db):
    def search():
        r = subprocess.run([sys.executable, "-m", "bicascade.cli", "search", "a red circle", "--db", tiny_db,
                            "--ladder", LADDER, "--k", "3", "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first, again = search(), search()
    assert len(first["results"]) == 3 and [lv["candidates"] for lv in first["stats"]["levels"]] == [50, 50, 14]
    assert [r["id"] for r in again["results"]] == [r["id"] for r in first["results"]]
    assert all(lv["encoded"] == 0 for lv in again["stats"]["levels"][1:])  # written back by the first run
    r = subprocess.run([sys.executable, "-m", "bicascade.cli", "search", "x", "--db", tiny_db, "--ladder", LADDER,
                        "--k", "20"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "k=20 exceeds the last cutoff" in r.stderr


def test_overload_gets_503_with_retry_after_then_recovers(tiny_db, free_port, wait_healthy, serve_command):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_command(tiny_db, LADDER, port, "--max-inflight", "2")
    try:
        wait_healthy(url, proc)
        bodies = [{"query": f"{n} {colour} {shape}s", "k": 10} for n in ("one", "two", "three")
                  for colour in ("green", "pink") for shape in ("circle", "square", "star")]
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: requests.post(f"{url}/search", json=b, timeout=120), bodies))
        shed = [r for r in answers if r.status_code == 503]
        assert shed and all(r.headers.get("Retry-After") == "1" and "overloaded" in r.json()["error"] for r in shed)
        assert all(r.status_code in (200, 503) for r in answers) and len(shed) < len(answers)
        again = requests.post(f"{url}/search", json=bodies[0], timeout=120)  # recovered without a restart
        assert again.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
