"""The paths real users take to load models, offline: open_clip's and Hugging Face's cache seeded with checkpoints in
the exact layout a download leaves (models--ORG--REPO/refs/main, snapshots/<commit>/FILE), the hub switched off, and
`ladders add` with an `hf-hub:ORG/REPO` level and an `ARCH@TAG` level, `index` and `search` through the real loading
code (open_clip.create_model with its pretrained config and hf_hub_download). An uncached tag is one line, exit 2
(tests/test_ladders.py)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from bicascade import models

from conftest import cli, cli_json

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
TINY_REPO = "bicascade-test/tiny-clip"
ARCH, TAG = "RN50", "yfcc15m"  # the smallest architecture with a pretrained tag (102M parameters)


def seed(hub: Path, repo: str, files: dict[str, object]) -> Path:
    """Files of `repo` in a Hugging Face cache as hf_hub_download leaves them: dicts as JSON, else torch.save."""
    root = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if name.endswith(".json"):
            (snapshot / name).write_text(json.dumps(content))
        else:
            torch.save(content, snapshot / name)
    return snapshot


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """HF_HOME with two repositories: a tiny open_clip model of our own (config + weights) and the weights behind
    open_clip's ARCH@TAG, each random (the bytes, not the training, are under test)."""
    home = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tiny = models.create("bc-tiny-s")
    config = {"model_cfg": models.model_config("bc-tiny-s"),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    seed(home / "hub", TINY_REPO, {"open_clip_config.json": config, "open_clip_pytorch_model.bin": tiny.state_dict()})
    big = open_clip.create_model(ARCH, pretrained=None)
    repo = open_clip.get_pretrained_cfg(ARCH, TAG)["hf_hub"].rstrip("/")  # open_clip's own entry for the tag
    seed(home / "hub", repo, {"open_clip_pytorch_model.bin": big.state_dict()})
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, big


def pictures(folder: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        blocks = Image.fromarray(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8))  # distinct coarse colour fields
        blocks.resize((80, 60 + i), Image.Resampling.BILINEAR).save(folder / f"p{i:02d}.png")
    return folder


def test_hub_levels_load_from_the_local_cache_through_add_index_and_search(offline_hub, tmp_path):
    env, big = offline_hub
    env = {**env, "BICASCADE_CACHE": str(tmp_path / "cache")}
    added = cli_json("ladders", "add", "hubbed", f"hf-hub:{TINY_REPO}", f"{ARCH}@{TAG}", env=env)
    levels = added["levels"]
    assert [lv["arch"] for lv in levels] == [f"hf-hub:{TINY_REPO}", ARCH]
    assert levels[0]["weights"] == f"hf-hub:{TINY_REPO}" and levels[1]["weights"] == f"open_clip:{TAG}"
    assert levels[0]["dim"] == 32 and levels[1]["dim"] == 1024 and levels[0]["gflops"] < levels[1]["gflops"]
    db = str(tmp_path / "db")
    assert cli_json("index", str(pictures(tmp_path / "photos")), "--db", db, "--ladder", "hubbed",
                    env=env)["rows"] == 12
    found = cli_json("search", "a photo", "--db", db, "--k", "5", env=env)
    assert len(found["results"]) == 5 and [s["encoded"] for s in found["stats"]["levels"]][1] == 12
    again = cli_json("search", "--image", str(tmp_path / "photos" / "p03.png"), "--db", db, "--k", "1", env=env)
    assert again["results"][0]["uri"].endswith("p03.png")  # the RN50 level's own embedding of the same picture
    # the weights really came from the cache: the level's vector is the seeded RN50's
    spec = models.ModelSpec("x", ARCH, pretrained=TAG)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from huggingface_hub import constants
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(constants, "HF_HUB_CACHE", str(Path(env["HF_HOME"]) / "hub"))
        loaded = models.build_model(spec)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), big.state_dict().values()))


def test_a_hub_repository_not_in_the_cache_is_one_line(offline_hub, tmp_path):
    env = {**offline_hub[0], "BICASCADE_CACHE": str(tmp_path / "cache")}
    r = cli("ladders", "add", "missing", "hf-hub:nobody/nothing", f"{ARCH}@{TAG}", check=False, env=env, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert "hf-hub:nobody/nothing" in lines[0] and "ARCH=PATH" in lines[0]
