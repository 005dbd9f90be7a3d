"""Autoscaling, really: serve/config.yaml run by `serve run` (as an operator deploys it), sustained HTTP load scales
the expensive level's Encoder to two replicas, and it scales back down when the load falls, with no failed request
during either transition. Replicas reserve a quarter CPU, so all of it fits on 2 cores."""
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import yaml

from bicascade.serve import config as serve_config

from conftest import free_port, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
LADDER = "synthetic-tiny"
WORDS = (("one", "two", "three"), ("small", "large"), ("plain", "striped"),
         ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"),
         ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring"))


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


@pytest.fixture(scope="module")
def cold_db(tiny_db, tmp_path_factory):
    """6,000 generated images indexed: the load's queries keep missing the top level's cache for the whole test.
    (Over the 300 test images the caches were warm within seconds, and warm queries left the expensive level too
    idle for the autoscaler in about one run of three.)"""
    import ray

    from bicascade.pipelines.ingest import index
    from bicascade.pipelines.lab import world

    root = world.make_world(tmp_path_factory.mktemp("world"), replace(world.tiny(), seed=1, train=5, val=5, test=6000))
    db = str(tmp_path_factory.mktemp("cold-db"))
    try:
        index.run_index(str(root / "test"), db, LADDER)
    finally:
        ray.shutdown()
    return db


def config_for_test(db: str, port: int) -> dict:
    """The shipped config, pointed at the test corpus, with an expensive level that scales within seconds."""
    doc = serve_config.document()
    doc["http_options"]["port"] = port
    app = doc["applications"][0]
    app["args"].update(db=db, group_gflops=0)  # the top level in a deployment of its own, as a real one is
    top = next(d for d in app["deployments"] if d["name"] == "Encoder2")
    # on 2 cores one client nearly saturates the ingress, so the top Encoder's queue stays short: a low target
    top["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0.5,
                                 "metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 1,
                                 "downscale_delay_s": 4}
    return doc


class Load:
    """`target` clients, each posting distinct queries back to back; every answer's status is kept."""

    def __init__(self, url: str) -> None:
        self.url, self.statuses, self.target, self.pause = url, [], 0, 0.0
        queries = [" ".join(w) for w in itertools.product(*WORDS)]  # 768, in an order that jumps between topics
        self.queries = itertools.cycle(random.Random(0).sample(queries, len(queries)))
        self.threads: list[threading.Thread] = []

    def set(self, clients: int, pause: float = 0.0) -> None:
        self.target, self.pause = clients, pause  # clients numbered >= target stop after their current request
        for i in range(clients):
            if i >= len(self.threads) or not self.threads[i].is_alive():
                t = threading.Thread(target=self.client, args=(i,), daemon=True)
                self.threads[i:i + 1] = [t]
                t.start()

    def client(self, i: int) -> None:
        while i < self.target:
            r = requests.post(f"{self.url}/search", json={"query": next(self.queries), "k": 5}, timeout=120)
            self.statuses.append(r.status_code)
            time.sleep(self.pause)

    def close(self) -> None:
        self.set(0)
        for t in self.threads:
            t.join(timeout=150)


def replica_counts(url: str) -> dict[str, int]:
    return requests.get(f"{url}/stats", timeout=30).json()["replicas"]


def replicas(url: str) -> int:
    return replica_counts(url)["Encoder2"]


def wait_for(predicate, timeout: float, url: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out; running replicas: {replica_counts(url)}"
        time.sleep(1)
    return time.monotonic() - t0


def test_expensive_level_scales_up_under_load_and_back_down(cold_db, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_for_test(cold_db, port)))
    serve_cli = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_cli), "run", str(config)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True,
                            # a local cluster of its own, on 127.0.0.1 (see bicascade.pipelines.runtime): "local",
                            # since ray.init without an address joins the run's shared cluster (`ray start`'s), where
                            # a `serve run` killed before its shutdown would leave Serve for the next module's app
                            env={**os.environ, "RAY_ADDRESS": "local", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    load = Load(url)
    try:
        wait_healthy(url, proc)  # the ingress answers before every deployment is up (`serve run` does not wait)
        wait_for(lambda: replicas(url) == 1, timeout=240, url=url)
        load.set(8)
        up = wait_for(lambda: replicas(url) >= 2, timeout=240, url=url)
        at_peak = len(load.statuses)
        time.sleep(5)  # two replicas serving the load
        load.set(1, pause=0.5)  # the load falls to a trickle, which keeps requests in flight while a replica stops
        down = wait_for(lambda: replicas(url) == 1, timeout=240, url=url)
        time.sleep(3)
        load.close()
        print(f"Encoder2: 2 replicas after {up:.1f} s of load ({at_peak} searches), 1 again {down:.1f} s after it "
              f"fell; {len(load.statuses)} searches; top-level cache "
              f"{requests.get(f'{url}/stats', timeout=30).json()['levels'][-1]}")
        assert at_peak > 0 and len(load.statuses) > at_peak
        assert set(load.statuses) == {200}  # nothing failed while replicas started or stopped
    finally:
        load.close()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
