"""Nothing assumes one node: a real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`),
an index job and a served query on it, compared with the single-process run over the same database."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from bicascade.actors import router
from bicascade.pipelines import train

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
LADDER = "synthetic-tiny"
QUERIES = ["a red circle", "two blue squares in a row"]
RAY = str(Path(sys.executable).with_name("ray"))
PLACEMENT = f"""
import json, ray
from ray import serve
from bicascade.actors import router
ray.init(namespace="bicascade")
print(json.dumps({{
    "workers": [n["NodeID"] for n in ray.nodes() if n["Alive"] and "worker_node" in n["Resources"]],
    "encoders": [serve.get_deployment_handle(f"Encoder{{j}}", "bicascade").info.remote().result()["node"]
                 for j in range(3)],
    "writers": [ray.get(ray.get_actor(f"bicascade-cache-{{i.fingerprint}}").node.remote())
                for i in router.ladder_levels({LADDER!r})[1:]]}}))
"""


@pytest.fixture
def cluster(free_port):
    """Head with no CPUs (drivers, Serve controller, cache writers) + a worker with 2 CPUs (all compute)."""
    address = f"127.0.0.1:{free_port()}"
    # token auth is on by default for `ray start`; this throwaway cluster listens on this machine only
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=0",
                        "--include-dashboard=false", *common], check=True, env=env, timeout=180, capture_output=True)
        subprocess.run([RAY, "start", f"--address={address}", "--num-cpus=2", '--resources={"worker_node": 1}',
                        *common], check=True, env=env, timeout=180, capture_output=True)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=180, capture_output=True)


def test_index_and_serve_on_two_nodes(cluster, tmp_path, free_port, wait_healthy):
    _, root = train.ensure_ladder(LADDER)
    db = str(tmp_path / "db")
    env = {**os.environ, "RAY_ADDRESS": cluster, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "bicascade.cli", "index", str(root / "test"), "--db", db,
                          "--ladder", LADDER, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"] == 300

    cascade, _ = router.local_cascade(db, LADDER, [50, 14], device="cpu")  # one process, no Ray: the reference
    want = {q: [r.id for r in cascade.search(q, k=10).results] for q in QUERIES}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "bicascade.cli", "serve", "--db", db, "--ladder", LADDER,
                             "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_healthy(url, proc)
        for q in QUERIES:
            got = requests.post(f"{url}/search", json={"query": q, "k": 10}, timeout=120).json()
            assert [r["id"] for r in got["results"]] == want[q]
        placement = subprocess.run([sys.executable, "-c", PLACEMENT], env=env, capture_output=True, text=True,
                                   timeout=120)  # its own driver: this process stays free of the cluster
        assert placement.returncode == 0, placement.stderr
        where = json.loads(placement.stdout)
        assert set(where["encoders"]) <= set(where["workers"]) and set(where["writers"]).isdisjoint(where["workers"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


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
