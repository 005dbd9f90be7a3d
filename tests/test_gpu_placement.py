"""GPUs in serving, checked on this CPU machine with Ray's logical GPU resources (Ray does not look at the hardware):
each Encoder replica requests a share of the cluster's GPUs by its level's cost and is placed with it."""
import pytest
import ray
import requests
from ray import serve

from bicascade.levels import LevelInfo, ModelSpec
from bicascade.pipelines import runtime
from bicascade.serve import build, config, server
from bicascade.serve.app import AppConfig

from conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


def test_cheap_levels_share_a_deployment_and_real_ones_get_their_own():
    def infos(*gflops):
        return [LevelInfo(ModelSpec(f"l{j}", "ViT-B-32"), f"fp{j}", 8, g, j) for j, g in enumerate(gflops)]
    assert build.groups(infos(0.01, 0.05, 0.2), 1.0) == [[0, 1, 2]]
    assert build.groups(infos(0.01, 0.05, 0.2), 0) == [[0], [1], [2]]
    assert build.groups(infos(0.5, 4.4, 17.6), 1.0) == [[0], [1], [2]]  # one cheap level alone: its own
    assert build.groups(infos(0.01, 0.05, 17.6), 1.0) == [[0, 1], [2]]
    assert build.groups(infos(4.4, 0.5, 0.9), 1.0) == [[0], [1, 2]]  # e.g. patch-dropping levels of one model
    opts = {"Encoder0": {"ray_actor_options": {"num_cpus": 0.25}}, "Encoder1": {"ray_actor_options": {"num_cpus": 0.5}}}
    got = build.encoder_options(opts, infos(1.0, 4.0, 15.0), 2, [[0, 1], [2]])
    assert [o["ray_actor_options"] for o in got] == [{"num_cpus": 0.25, "num_gpus": 0.5},  # the group's shares, summed
                                                     {"num_cpus": 0.5, "num_gpus": 1.0}]


def test_shares_follow_level_cost():
    assert build.gpu_shares([1.0, 4.0, 15.0], 0) == [0.0, 0.0, 0.0]
    assert build.gpu_shares([1.0, 4.0, 15.0], 1) == [0.05, 0.2, 0.75]
    assert build.gpu_shares([1.0, 4.0, 15.0], 2) == [0.1, 0.4, 1.0]  # no replica takes more than one GPU


def test_encoder_replicas_request_and_get_their_gpu_share(tiny_db, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local cluster of its own, with two logical GPUs
    runtime.connect(config.runtime_env(), num_gpus=2)
    try:
        url = server.deploy(AppConfig(db=tiny_db, group_gflops=0), port=free_port())  # a deployment per level
        assert requests.post(f"{url}/search", json={"query": "a red circle", "k": 5}, timeout=120).status_code == 200
        infos = [serve.get_deployment_handle(f"Encoder{j}", "bicascade").info.remote().result() for j in range(3)]
        from bicascade import query
        from bicascade.storage import tables

        levels = query.open_ladder(tables.Database(tiny_db), None).levels
        want = build.gpu_shares([lv.gflops for lv in levels], 2)
        got = {j: info["resources"].get("GPU", 0) for j, info in enumerate(infos)}  # what each replica was given
        assert got == dict(enumerate(want)), (got, want)
        # nothing else (router, ingress, proxy) holds a GPU: the cluster has exactly the rest left
        assert ray.available_resources().get("GPU", 0) == pytest.approx(2 - sum(want))
        assert [i["model"] for i in infos] == [lv.name for lv in levels]
    finally:
        server.stop()
