"""Nothing assumes one node: a real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`),
an index job and a served query on it, compared with the single-process run over the same database."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from bicascade import query
from bicascade.pipelines.lab import train

from conftest import LOOPBACK, cli_json, free_port, listening, serving

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
LADDER = "synthetic-tiny"
QUERIES = ["a red circle", "two blue squares in a row"]
RAY = str(Path(sys.executable).with_name("ray"))
PLACEMENT = f"""
import json, ray
from ray import serve
from bicascade import query
ray.init(namespace="bicascade")
print(json.dumps({{
    "workers": [n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"]],
    "encoders": [serve.get_deployment_handle(f"Encoder{{j}}", "bicascade").info.remote().result()["node"]
                 for j in range(3)],
    "writers": [ray.get(ray.get_actor(f"bicascade-cache-{{i.fingerprint}}").node.remote())
                for i in query.registered({LADDER!r}).levels[1:]]}}))
"""
# `ray start --address` with a loopback node IP: Ray 2.60 rewrites 127.0.0.1 to the interface address unless its
# cluster mode is off, and refuses to join a cluster when it is; keep the address as given instead
RAY_START = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")
LOCAL = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(autouse=True)
def isolated_cache(tiny_session, monkeypatch):  # the run's tiny ladder, trained once
    monkeypatch.setenv("BICASCADE_CACHE", tiny_session[0])


@pytest.fixture
def cluster():
    """Head with no CPUs (drivers, Serve controller, cache writers) + a worker with 2 CPUs (all compute), both on
    127.0.0.1 only; token auth off (it is on by default for `ray start`): this cluster listens on loopback only."""
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, **LOCAL}
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=0",
                        "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                        f"--dashboard-agent-listen-port={free_port()}", *common], check=True, env=env, timeout=180,
                       capture_output=True)
        worker_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        subprocess.run([sys.executable, "-c", RAY_START, "start", f"--address={address}", "--num-cpus=2",
                        '--resources={"worker_node": 1}', f"--dashboard-agent-listen-port={free_port()}", *common],
                       check=True, env=worker_env, timeout=180, capture_output=True)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=180, capture_output=True)


def test_index_and_serve_on_two_nodes(cluster, tmp_path):
    _, root = train.ensure_ladder(LADDER)
    db = str(tmp_path / "db")
    env = {**LOCAL, "RAY_ADDRESS": cluster}
    assert cli_json("index", str(root / "test"), "--db", db, "--ladder", LADDER, env=env)["rows"] == 300

    search = query.LocalSearch(db, device="cpu")  # one process, no Ray: the reference
    want = {q: [r["id"] for r in search.search(q, k=10)["results"]] for q in QUERIES}
    search.close()

    with serving(db, env=env) as server:
        for q in QUERIES:
            got = requests.post(f"{server.url}/search", json={"query": q, "k": 10}, timeout=120).json()
            assert [r["id"] for r in got["results"]] == want[q]
        placement = subprocess.run([sys.executable, "-c", PLACEMENT], env={**os.environ, **env}, capture_output=True,
                                   text=True, timeout=120)  # its own driver: this process stays free of the cluster
        assert placement.returncode == 0, placement.stderr
        where = json.loads(placement.stdout)
        assert set(where["encoders"]) <= set(where["workers"]) and set(where["writers"]).isdisjoint(where["workers"])
        sockets = listening([server.proc.pid], marker=cluster)  # the app's driver, both nodes and their workers
        assert len(sockets) > 5 and {ip for ip, _, _ in sockets} <= LOOPBACK, sockets
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
