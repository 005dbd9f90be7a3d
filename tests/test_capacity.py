"""`bicascade capacity`: the model's figures follow from its inputs, stay within the bounds the design states, and
agree with what this project measured (a simulated p-small-world stream, the 1M ANN run)."""
import json
import math
from pathlib import Path

import pytest

from bicascade import capacity, costs, registry
from bicascade.errors import BadInputError

from conftest import cli, cli_json

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_the_cache_model_matches_the_simulated_stream_and_bounds_it():
    """bench/results/simulate_synthetic_100k.json: 10,000 queries over 100,000 images at p = 0.1 cached 9,988 images
    at m_1 = 50 and 4,004 at m_2 = 14; the model says ~10,000 for both (the second a bound: a level's top m_2 falls in
    a smaller set than p x N)."""
    doc = json.loads((RESULTS / "simulate_synthetic_100k.json").read_text())
    run = doc["cascades"][0]
    reach = doc["p_requested"] * doc["images"]
    for m, coverage in zip(run["m"], run["coverage_per_level"][1:]):
        predicted = capacity.cached_rows(reach, doc["queries"], m)
        assert predicted >= coverage * doc["images"] and predicted <= reach
    assert capacity.cached_rows(reach, doc["queries"], run["m"][0]) == pytest.approx(
        run["coverage_per_level"][1] * doc["images"], rel=0.01)
    assert capacity.cached_rows(reach, 100, 50) == pytest.approx(reach * (1 - math.exp(-0.5)), abs=1)


def test_the_plan_follows_from_its_inputs():
    small, big = (capacity.plan(n, "openclip-vit", "h100", qps=100, p=0.1) for n in (1_000_000, 1_000_000_000))
    level0, top = (registry.get_model(n) for n in registry.get_ladder("openclip-vit").levels[::2])
    assert small.index["pflops"] == pytest.approx(1e6 * costs.image_gflops(level0) / 1e6, rel=1e-3)
    assert big.index["gpu_hours"] == pytest.approx(big.index["pflops"] * 1e6 / (989e3 * 0.35) / 3600, rel=1e-3)
    assert small.index["bound"] == "decode"  # 12 MP photos on 16 cores: the decoding, not the GPU
    assert small.index["usd"] == pytest.approx(small.index["node_hours"] * 4.0, rel=0.01)
    assert small.ann["shards"] == 1 and small.ann["query_ms_per_shard"] == pytest.approx(13.96)  # the 1M point
    assert big.ann["shards"] == max(big.ann["shards_for_memory"], big.ann["shards_for_latency"]) > 1
    assert big.ann["query_ms_per_shard"] <= 30.0 and big.ann["rows_per_shard"] * big.ann["shards"] >= 1e9
    assert big.storage_gb["cache_" + top.name] == pytest.approx(0.1 * 1e9 * (1024 * 4 + 24) / 1e9, rel=1e-3)
    growth = [g["rows"] for g in big.cache_growth.values()]
    assert growth == sorted(growth) and all(r <= 0.1 * 1e9 for rows in growth for r in rows)
    assert big.serving["gpus_after_a_month"] < big.serving["gpus_cold"]
    cold = big.serving["text_gflops_per_query"] + 50 * costs.image_gflops("ViT-L-14") + 14 * costs.image_gflops(top)
    assert big.serving["gpus_cold"] == pytest.approx(100 * cold / (989e3 * 0.35), rel=1e-3)
    cheaper = capacity.plan(1_000_000_000, "openclip-vit", "h100", qps=100, usd_per_gpu_hour=2.0)
    assert cheaper.index["usd"] == pytest.approx(big.index["usd"] / 2, rel=1e-3)
    for bad in ({"gpu": "tpu"}, {"p": 0}, {"corpus": "video"}, {"cutoffs": [50]}):
        with pytest.raises(BadInputError):
            capacity.plan(1000, "openclip-vit", **{"gpu": "h100", **bad})


def test_the_command():
    doc = cli_json("capacity", "--images", "100000000", "--ladder", "openclip-vit", "--gpu", "h200", "--qps", "50",
                   "--corpus", "web")
    assert doc["gpu"] == "NVIDIA H200" and doc["images"] == 100_000_000 and doc["corpus"] == "web"
    assert set(doc["cache_growth"]) == set(capacity.AFTER) and doc["ann"]["shards"] >= 1
    text = capacity.plan(1_000_000, "openclip-vit").format()
    assert "index level 0:" in text and "level-0 ANN:" in text and "1 year: 100,000 (0.3)" in text
    r = cli("capacity", "--images", "10", "--ladder", "openclip-vit", "--gpu", "tpu", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown --gpu 'tpu'" in r.stderr
