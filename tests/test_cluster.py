"""Nothing assumes one node: a real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`),
an index job and a served query on it, compared with the single-process run over the same database; and an index
job that loses its worker node midway."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

import bicascade
from bicascade.pipelines.lab import train

from conftest import LOOPBACK_IPS, cli_json, free_port, listening, serving, start_cluster, stop_cluster, verified
from conftest import RAY_LOCAL as LOCAL

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
LADDER = "synthetic-tiny"
QUERIES = ["a red circle", "two blue squares in a row"]
PLACEMENT = f"""
import json, sys, ray
from ray import serve
from bicascade import query
from bicascade.actors.router import writer_name
ray.init(namespace="bicascade")
print(json.dumps({{
    "workers": [n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"]],
    "encoders": [serve.get_deployment_handle(f"Encoder{{j}}", "bicascade").info.remote().result()["node"]
                 for j in range(3)],
    "writers": [ray.get(ray.get_actor(writer_name(sys.argv[1], i.fingerprint)).node.remote())
                for i in query.registered({LADDER!r}).levels[1:]]}}))
"""
# `ray start --address` with a loopback node IP: Ray 2.60 rewrites 127.0.0.1 to the interface address unless its
# cluster mode is off, and refuses to join a cluster when it is; keep the address as given instead
RAY_START = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")
COMMON = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]


@pytest.fixture(autouse=True)
def isolated_cache(tiny_session, monkeypatch):  # the run's tiny ladder, trained once
    monkeypatch.setenv("BICASCADE_CACHE", tiny_session[0])


def join(address: str, block: bool = False) -> subprocess.Popen | None:
    """A worker node with 2 CPUs (all compute) joins; with `block`, in its own process group, so that killing the
    group kills the node (raylet, object store and its workers), as a lost machine would."""
    env = {k: v for k, v in {**os.environ, **LOCAL}.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    args = [sys.executable, "-c", RAY_START, "start", f"--address={address}", "--num-cpus=2",
            '--resources={"worker_node": 1}', f"--dashboard-agent-listen-port={free_port()}", *COMMON]
    if block:
        return subprocess.Popen([*args, "--block"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    subprocess.run(args, check=True, env=env, timeout=180, capture_output=True)
    return None


@pytest.fixture
def cluster():
    """A cluster of its own: a head with no CPUs (drivers, Serve controller, cache writers) and one worker node."""
    address = start_cluster(num_cpus=0)
    try:
        join(address)
        yield address
    finally:
        stop_cluster(address)


def test_index_and_serve_on_two_nodes(cluster, tmp_path):
    _, root = train.ensure_ladder(LADDER)
    db = str(tmp_path / "db")
    env = {**LOCAL, "RAY_ADDRESS": cluster}
    assert cli_json("index", str(root / "test"), "--db", db, "--ladder", LADDER, env=env)["rows"] == 300

    with bicascade.open(db, device="cpu") as photos:  # one process, no Ray: the reference
        want = {q: [h.id for h in photos.search(q, k=10)] for q in QUERIES}

    with serving(db, "--group-gflops", "0", env=env) as server:  # a deployment per level, each on a worker
        for q in QUERIES:
            got = requests.post(f"{server.url}/search", json={"query": q, "k": 10}, timeout=120).json()
            assert [r["id"] for r in got["results"]] == want[q]
        placement = subprocess.run([sys.executable, "-c", PLACEMENT, db], env={**os.environ, **env},
                                   capture_output=True, text=True, timeout=120)  # its own driver, not this process
        assert placement.returncode == 0, placement.stderr
        where = json.loads(placement.stdout)
        assert set(where["encoders"]) <= set(where["workers"]) and set(where["writers"]).isdisjoint(where["workers"])
        sockets = listening([server.proc.pid], marker=cluster)  # the app's driver, both nodes and their workers
        assert len(sockets) > 5 and {ip for ip, _, _ in sockets} <= LOOPBACK_IPS, sockets
        assert server.stop() == 0, server.stderr[-4000:]


@pytest.mark.timeout(120)
def test_cluster_yaml_is_a_valid_launcher_config():
    """`ray up cluster.yaml` needs a cloud account; what can be checked here is that Ray's own launcher schema
    accepts it and that every node installs this package."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text()))
    validate_config(config)  # raises on unknown or missing fields
    assert {"head", "gpu_worker"} <= set(config["available_node_types"])
    assert any("pip install" in c and "~/bicascade" in c for c in config["setup_commands"])


INDEX = ("import sys; from bicascade.pipelines.ingest import index; print(index.run_index("
         "sys.argv[1], sys.argv[2], sys.argv[3], index.IndexConfig(batch_size=16, flush_rows=32)))")


def test_an_index_job_survives_the_loss_of_its_worker_node(tmp_path):
    """The only worker node (the head has no CPUs) is killed early in an index job and another joins: the lost and
    remaining work runs on the new node, and the job finishes with one row per image."""
    from bicascade.pipelines.lab import world
    from bicascade.storage import tables

    n = 3000  # seconds of work on this machine: most of it is left when the node dies
    root = world.make_world(tmp_path / "world", replace(world.tiny(), seed=2, train=5, val=5, test=n))
    db = str(tmp_path / "db")
    address = start_cluster(num_cpus=0)
    try:
        node = join(address, block=True)
        t0 = time.monotonic()
        with (tmp_path / "job.log").open("w") as log:  # a file, not a pipe: a full pipe would stall the job
            job = subprocess.Popen([sys.executable, "-c", INDEX, str(root / "test"), db, LADDER],
                                   env={**os.environ, **LOCAL, "RAY_ADDRESS": address}, stdout=log, stderr=log)
        sources = Path(db) / f"{tables.SOURCES}.lance"
        while job.poll() is None and time.monotonic() - t0 < 240:
            if sources.is_dir() and tables.Database(db).count(tables.SOURCES) >= 64:
                break
            time.sleep(0.2)
        partial = tables.Database(db).count(tables.SOURCES)
        os.killpg(node.pid, signal.SIGKILL)  # the worker node, mid-job
        node.wait(timeout=30)
        killed = time.monotonic()
        assert job.poll() is None and 0 < partial < n // 2, "the kill should land early in the job"
        join(address)  # a replacement machine
        job.wait(timeout=600)
        assert job.returncode == 0, (tmp_path / "job.log").read_text()[-4000:]
        report = verified(db)
        assert report.tables[0].rows == n == report.tables[1].rows and report.tables[1].duplicate_ids == 0
        print(json.dumps({"images": n, "written_before_kill": partial, "rows": report.tables[1].rows,
                          "duplicate_ids": 0, "finished_s_after_kill": round(time.monotonic() - killed, 1)}))
    finally:
        stop_cluster(address)
