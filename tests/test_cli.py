"""The `bicascade` command as a user runs it: subprocesses, one JSON document on stdout."""
import json

import pytest

from conftest import cli as run


def test_help_lists_subcommands():
    out = run("--help").stdout
    for cmd in ("costs", "ladders", "train", "eval", "index", "search", "serve", "simulate", "demo"):
        assert cmd in out


def test_costs_json_contract():
    out = run("costs", "ViT-B-16", "ViT-L-14", "ViT-L-14,ViT-g-14", "ViT-B-16,ViT-g-14",
              "ViT-B-16,ViT-L-14,ViT-g-14", "--json").stdout
    doc = json.loads(out)
    rows = doc["cascades"]
    assert [r["cascade"] for r in rows][-1] == ["ViT-B-16", "ViT-L-14", "ViT-g-14"]
    assert set(rows[0]) >= {"cascade", "gflops", "f_life", "f_latency"}
    assert rows[4]["f_latency"] > 1 and rows[3]["f_latency"] is None


def test_ladders_json_contract():
    doc = json.loads(run("ladders", "--json").stdout)
    names = {row["name"]: row for row in doc["ladders"]}
    assert names["openclip-vit"]["levels"] == ["ViT-B-16", "ViT-L-14", "ViT-g-14"]
    assert names["openclip-vit"]["shared_text_tower"] is False


def test_bad_input_exits_nonzero_with_message():
    r = run("costs", "ViT-B-16,nonexistent", "--json", check=False)
    assert r.returncode == 2 and "unknown model 'nonexistent'" in r.stderr and r.stdout == ""
    r = run("costs", "ViT-B-16", "--m", "5x", check=False)
    assert r.returncode == 2 and "comma-separated integers" in r.stderr


def test_serve_refuses_a_bad_key_file_before_starting_a_cluster(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("short admin\n")
    r = run("serve", "--db", str(tmp_path / "db"), "--api-key-file", str(keys), check=False)
    assert r.returncode == 2 and "api keys line 1" in r.stderr and "key of 16+ characters" in r.stderr
    assert "Ray instance" not in r.stderr and "Traceback" not in r.stderr  # refused before ray.init


def test_eval_unknown_ladder():
    r = run("eval", "--ladder", "nope", "--json", check=False)
    assert r.returncode == 2 and "unknown ladder 'nope'" in r.stderr and r.stdout == ""
    r = run("eval", "--ladder", "synthetic-tiny", "--json", check=False)  # nothing trains behind the user's back
    assert r.returncode == 2 and "bicascade train --ladder synthetic-tiny" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_demo_json_contract(tmp_path):
    r = run("demo", "--ladder", "synthetic-tiny", "--workdir", str(tmp_path), "--no-serve", "--json")
    doc = json.loads(r.stdout)
    assert doc["ladder"] == "synthetic-tiny" and doc["index"]["ladder"] == "synthetic-tiny"
    assert set(doc) >= {"db", "index", "eval", "simulate"}
    assert doc["eval"]["queries"] == 900 and len(doc["eval"]["levels"]) == 3
    assert (tmp_path / "world" / "captions.parquet").exists()
    assert doc["index"]["rows"] == 300 and doc["index"]["errors"] == 0
    assert doc["eval"]["db"] == doc["db"]  # level 0 of the report is the indexed table
    assert "step 3/5" in r.stderr  # progress goes to stderr, never stdout
    sim = doc["simulate"]
    assert sim["queries"] == 2000 and 0 < sim["p_measured"] <= 1 and sim["f_life_measured"] > 1
    assert (tmp_path / "report" / "summary.md").exists() and sim["report"] == str(tmp_path / "report")
