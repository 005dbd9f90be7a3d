"""`bicascade serve` and `bicascade search` as a user runs them, in subprocesses."""
import concurrent.futures as cf

import psutil
import pytest
import requests

from conftest import cli, cli_json, serving

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


def shed_under_overload(url: str) -> None:
    """18 concurrent cold searches against --max-inflight 2: some get 503 + Retry-After, none fails otherwise, and
    the next search is answered without a restart."""
    bodies = [{"query": f"{n} {colour} {shape}s", "k": 10} for n in ("one", "two", "three")
              for colour in ("green", "pink") for shape in ("circle", "square", "star")]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: requests.post(f"{url}/search", json=b, timeout=120), bodies))
    shed = [r for r in answers if r.status_code == 503]
    assert shed and all(r.headers.get("Retry-After") == "1" and "overloaded" in r.json()["error"] for r in shed)
    assert all(r.status_code in (200, 503) for r in answers) and len(shed) < len(answers)
    assert requests.post(f"{url}/search", json=bodies[0], timeout=120).status_code == 200


def listener(url: str) -> str:
    """The command line of the process that listens on the URL's port."""
    port = int(url.rsplit(":", 1)[1])
    pid = next(c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port)
    return " ".join(psutil.Process(pid).cmdline())


def test_serve_stops_cleanly_keeps_its_cache_across_a_restart_and_sheds_overload_with_503(tiny_db):
    body = {"query": "two small orange diamonds in a row", "k": 5}
    runs = []
    # the restart also shows the in-flight bound, and direct ingress: the Api replica itself on the port, no proxy
    # (on a local cluster of its own, which direct ingress needs)
    direct = ("--max-inflight", "2", "--direct")
    for flags, process, env in (((), "ProxyActor", {}), (direct, "ServeReplica:bicascade:Api", {"RAY_ADDRESS": ""})):
        with serving(tiny_db, *flags, env=env) as server:  # no --ladder: the database's own
            assert process in listener(server.url)
            runs.append(requests.post(f"{server.url}/search", json=body, timeout=120).json()["stats"]["levels"])
            if flags:
                shed_under_overload(server.url)
            assert server.stop() == 0, server.stderr[-4000:]
            assert f"serving {tiny_db} on {server.url}" in server.stderr
    assert sum(lv["encoded"] for lv in runs[0][1:]) > 0
    assert all(lv["cache_hits"] == lv["candidates"] and lv["encoded"] == 0 for lv in runs[1][1:])


def test_search_command_in_process(tiny_db):
    first = cli_json("search", "a red circle", "--db", tiny_db, "--k", "3")
    again = cli_json("search", "a red circle", "--db", tiny_db, "--k", "3")
    assert len(first["results"]) == 3 and [lv["candidates"] for lv in first["stats"]["levels"]] == [50, 50, 14]
    assert [r["id"] for r in again["results"]] == [r["id"] for r in first["results"]]
    assert all(lv["encoded"] == 0 for lv in again["stats"]["levels"][1:])  # written back by the first run
    r = cli("search", "x", "--db", tiny_db, "--k", "20", check=False)
    assert r.returncode == 2 and "k=20 exceeds the last cutoff" in r.stderr and "Traceback" not in r.stderr
    r = cli("search", "x", "--db", tiny_db + "-missing", check=False)
    assert r.returncode == 2 and "has not been indexed" in r.stderr
    picture = first["results"][1]["uri"]  # an indexed file, searched by its picture: it comes back first
    by_image = cli_json("search", "--image", picture, "--db", tiny_db, "--k", "3")
    assert by_image["results"][0]["uri"] == picture and by_image["results"][0]["score"] == pytest.approx(1, abs=1e-4)


def test_search_works_where_ray_cannot_be_imported(tiny_db, tmp_path):
    stub = tmp_path / "stub" / "ray"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    with_ray = cli_json("search", "a small green star", "--db", tiny_db, "--k", "5")
    without = cli_json("search", "a small green star", "--db", tiny_db, "--k", "5",
                       env={"PYTHONPATH": str(tmp_path / "stub")})
    assert [r["id"] for r in without["results"]] == [r["id"] for r in with_ray["results"]]
    assert [r["score"] for r in without["results"]] == pytest.approx([r["score"] for r in with_ray["results"]])


def test_direct_ingress_refuses_what_it_cannot_serve(tiny_db):
    r = cli("serve", "--db", tiny_db, "--direct", check=False, env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 2 and "direct ingress starts a cluster of its own" in r.stderr
    assert "Traceback" not in r.stderr
