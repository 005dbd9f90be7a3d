"""Least exposure: `bicascade serve`'s whole Ray cluster listens on loopback only; API keys (read and admin) guard
every route but /healthz and never reach a log; per-client rate limits answer 429 with Retry-After across ingress
replicas; and a schema-driven fuzz of the whole HTTP API (schemathesis, every default check) with keys off and on."""
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from bicascade.storage import tables

from conftest import LOOPBACK_IPS, listening, ray_logs, serving

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
READ, ADMIN = "read-key-5b2f9c1e7d3a4f60", "admin-key-0c8e61d94b7a2f35"
HOOKS = Path(__file__).with_name("fuzz_hooks.py")


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(f"# who may search\n{READ} read\n{ADMIN} admin\n")
    return str(path)


# three servers, each started once and stopped by its last test (one up at a time): a low rate limit over two
# ingress replicas, keys off (its fuzz), and keys on (its fuzz, then the key checks, which read every log it wrote)
@pytest.fixture(scope="module")
def open_server(tiny_db, tmp_path_factory):
    # a copy of its own: with keys off, the fuzz's DELETE /images/ID (ids taken from its searches) really removes
    db = tmp_path_factory.mktemp("open") / "db"
    shutil.copytree(tiny_db, db)
    with serving(str(db)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tiny_db, keyfile):
    with serving(tiny_db, "--api-key-file", keyfile) as server:
        yield server


@pytest.fixture(scope="module")
def limited_server(tiny_db):
    # a local cluster of its own, as `bicascade serve` starts it: its sockets are what the loopback test checks
    with serving(tiny_db, "--rate", "2", "--burst", "4", "--replicas", "Api=2", env={"RAY_ADDRESS": ""}) as server:
        yield server


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_the_local_cluster_listens_on_loopback_only(limited_server):
    sockets = listening([limited_server.proc.pid])  # the driver, GCS, raylet, agents, workers and replicas
    assert len(sockets) > 5 and {ip for ip, _, _ in sockets} <= LOOPBACK_IPS, sockets
    print(f"{len(sockets)} listening sockets on {sorted({ip for ip, _, _ in sockets})}")


def test_rate_limits_answer_429_across_ingress_replicas_then_recover(limited_server):
    url = limited_server.url
    t0 = time.monotonic()
    answers = [requests.post(f"{url}/search", json={"query": "a blue star", "k": 3}, timeout=60) for _ in range(20)]
    elapsed = time.monotonic() - t0
    ok = [r for r in answers if r.status_code == 200]
    limited = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(limited) == 20 and limited
    assert len(ok) <= 4 + 2 * elapsed + 1  # one shared bucket for both replicas, not one each
    assert all(int(r.headers["Retry-After"]) >= 1 and "rate limit" in r.json()["error"] for r in limited)
    time.sleep(int(limited[-1].headers["Retry-After"]) + 1)
    assert requests.post(f"{url}/search", json={"query": "a blue star"}, timeout=60).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # never limited
    assert limited_server.stop() == 0, limited_server.stderr[-4000:]  # its last test: one server up at a time


def fuzz(url: str, har: Path, *headers: str, examples: int = 25) -> dict:
    """schemathesis over the server's own OpenAPI document, every default check on; returns its case count and
    the status codes of every response it got (from its HAR record of the run)."""
    args = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json", "--checks", "all",
            "--max-examples", str(examples), "--seed", "1", "--workers", "1", "--request-timeout", "60",
            "--wait-for-schema", "60", "--report", "har", "--report-har-path", str(har)]
    for h in headers:
        args += ["--header", h]
    doc = requests.get(f"{url}/openapi.json", headers=dict(h.split(": ", 1) for h in headers), timeout=60)
    assert doc.status_code == 200 and "openapi" in doc.json(), doc.text[:2000]
    r = subprocess.run(args, capture_output=True, text=True, timeout=800,
                       env={"SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(HOOKS.parent),
                            "PATH": str(Path(sys.executable).parent), "HOME": str(Path.home())})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", out))
    statuses = Counter(e["response"]["status"] for e in json.loads(har.read_text())["log"]["entries"])
    assert cases > 0 and sum(statuses.values()) >= cases
    return {"cases": cases, "statuses": dict(sorted(statuses.items()))}


def test_the_whole_api_fuzzed_from_its_schema_with_keys_off(open_server, tmp_path):
    off = fuzz(open_server.url, tmp_path / "off.har")
    assert requests.get(f"{open_server.url}/healthz", timeout=30).status_code == 200
    assert open_server.stop() == 0, open_server.stderr[-4000:]
    print(json.dumps({"keys_off": off}))
    assert not [s for s in off["statuses"] if s >= 500], off


def test_the_whole_api_fuzzed_from_its_schema_with_keys_on(keyed_server, tmp_path):
    on = fuzz(keyed_server.url, tmp_path / "on.har", f"Authorization: Bearer {ADMIN}")
    assert requests.get(f"{keyed_server.url}/healthz", timeout=30).status_code == 200
    print(json.dumps({"keys_on": on}))
    assert not [s for s in on["statuses"] if s >= 500], on


def test_api_keys_guard_every_route_and_never_reach_a_log(keyed_server, tiny_db):
    """The keyed server's last test: it stops the server to read every log, the fuzz's requests' included."""
    server = keyed_server
    url = server.url
    body = {"query": "a red circle", "k": 3}
    for route, method in (("/search", "post"), ("/stats", "get"), ("/metrics", "get"), ("/", "get"),
                          ("/openapi.json", "get"), ("/indices-list", "get"), ("/ladder", "get")):
        r = getattr(requests, method)(f"{url}{route}", json=body, timeout=60)
        assert r.status_code == 401 and "API key" in r.json()["error"], (route, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.post(f"{url}/search", json=body, headers=bearer("x" * 24), timeout=60).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"ok": True}
    hit = requests.post(f"{url}/search", json=body, headers=bearer(READ), timeout=60)
    assert hit.status_code == 200 and len(hit.json()["results"]) == 3
    image = hit.json()["results"][0]["id"]
    assert requests.get(f"{url}/images/{image}", headers=bearer(READ), timeout=30).status_code == 200
    assert requests.get(f"{url}/images/{image}", timeout=30).status_code == 401
    assert requests.get(f"{url}/stats", headers=bearer(READ), timeout=30).status_code == 403  # admin routes
    level0 = tables.emb_table(tables.Database(tiny_db).recorded_ladder()[0]["fingerprint"])
    rows = tables.Database(tiny_db).count(level0)  # 300, less what the fuzz's admin DELETEs removed
    assert requests.get(f"{url}/stats", headers=bearer(ADMIN), timeout=30).json()["rows"] == rows <= 300
    assert requests.delete(f"{url}/images/{image}", headers=bearer(READ), timeout=30).status_code == 403
    assert requests.delete(f"{url}/images/{image}", timeout=30).status_code == 401
    assert requests.delete(f"{url}/images/{image}", headers=bearer(ADMIN), timeout=30).status_code == 200
    assert requests.get(f"{url}/stats", headers=bearer(ADMIN), timeout=30).json()["rows"] == rows - 1
    assert "bicascade_" in requests.get(f"{url}/metrics", headers=bearer(ADMIN), timeout=30).text
    assert requests.get(f"{url}/?key={READ}", timeout=30).status_code == 200  # the page, opened from a link
    assert requests.get(f"{url}/", auth=("anyone", READ), timeout=30).status_code == 200  # a browser's prompt
    server.stop()
    logs = server.stderr + ray_logs()
    assert READ not in logs and ADMIN not in logs
