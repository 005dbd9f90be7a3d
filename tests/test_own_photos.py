"""A new user's path, through the real parts: their own CLIP checkpoints (two standard open_clip architectures saved
from random init) made a ladder from the command line, a folder of real photographs as phones and cameras write
them, `bicascade index` once with `--ladder`, then `search` and `serve` on that database without it."""
import io

import numpy as np
import pytest
import requests
from PIL import Image

from bicascade import images, models
from bicascade.pipelines.lab import photos
from bicascade.storage import tables

from conftest import cli, cli_json, serving

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """Checkpoints, a ladder made from them, and the photos indexed: what the README's quickstart does."""
    from conftest import cache_at

    pytest.importorskip("skimage")
    root = tmp_path_factory.mktemp("user")
    with cache_at(root / "cache"):
        for i, arch in enumerate(("ViT-S-32", "ViT-S-16")):
            models.save_checkpoint(models.build_model(models.ModelSpec(arch, arch, seed=i)), root / f"{arch}.pt")
        files = photos.write(root / "photos")
        levels = [f"{arch}={root / arch}.pt" for arch in ("ViT-S-32", "ViT-S-16")]
        added = cli_json("ladders", "add", "mine", *levels)
        indexed = cli_json("index", str(root / "photos"), "--db", str(root / "db"), "--ladder", "mine")
        yield root, files, added, indexed


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares the user fixture's cache
    yield


def test_the_ladder_was_made_from_the_checkpoints(user):
    _, _, added, _ = user
    assert [lv["arch"] for lv in added["levels"]] == ["ViT-S-32", "ViT-S-16"] and not added["shared_text_tower"]
    assert added["levels"][0]["gflops"] < added["levels"][1]["gflops"]


def test_rotated_copies_are_one_upright_photo(user):
    root, files, _, indexed = user
    assert indexed["errors"] == 0 and indexed["rows"] == sum(len(v) for v in files.values())
    assert indexed["ignored"] == 1  # the phone's .AAE sidecar, said and left out
    db = tables.Database(str(root / "db"))
    rows = {r["uri"]: r for r in db.dataset(tables.IMAGES).to_table(columns=["id", "uri", "width", "height"])
            .to_pylist()}
    upright = files["coffee"][0]
    w, h = Image.open(upright).size
    copies = [rows[str(p)] for p in files["coffee"]]
    assert all((c["width"], c["height"]) == (w, h) for c in copies)  # EXIF 6 and 8 stored sideways, read upright
    vectors = db.vectors(db.recorded_ladder()[0]["fingerprint"], [c["id"] for c in copies])
    assert np.abs(vectors - vectors[0]).max() < 1e-5
    assert any(str(p).endswith(".tiff") for p in files["coffee"]) and files["retina"][-1].suffix == ".heic"
    phone = rows[str(root / "photos" / "chelsea-phone.JPG")]
    cat = Image.open(root / "photos" / "chelsea.jpg").size
    assert (phone["width"], phone["height"]) == cat  # the phone's sideways JPEG comes out upright
    big = rows[str(root / "photos" / "hubble-large.jpg")]
    assert (big["width"], big["height"]) == (5000, 4360)  # 21.8 MP: shrunk while decoding, not refused
    stored = db.image_bytes([big["id"]])[big["id"]]
    assert len(stored) <= images.MAX_STORED_BYTES * 2 and max(Image.open(io.BytesIO(stored)).size) <= 1024


def test_search_and_serve_use_the_database_ladder(user):
    root, _, _, _ = user
    db = str(root / "db")
    local = cli_json("search", "a cat on a sofa", "--db", db, "--k", "3")
    assert [lv["model"] for lv in local["stats"]["levels"]] == ["mine/ViT-S-32", "mine/ViT-S-16"]
    long_query = "a photo of " + "a very long description of a scene with many words " * 20
    emoji = cli_json("search", "🐱 на диване, 猫", "--db", db, "--k", "3")
    assert len(emoji["results"]) == 3
    with serving(db) as server:
        served = requests.post(f"{server.url}/search", json={"query": "a cat on a sofa", "k": 3}, timeout=300).json()
        assert [r["id"] for r in served["results"]] == [r["id"] for r in local["results"]]
        truncated = requests.post(f"{server.url}/search", json={"query": long_query[:1000], "k": 3}, timeout=300)
        assert truncated.status_code == 200  # longer than the tokenizer's 77 tokens: truncated, not refused
        assert server.stop() == 0, server.stderr[-4000:]
    r = cli("index", str(root / "photos"), "--db", db, "--ladder", "openclip-vit", check=False)
    assert r.returncode == 2 and "level 0" in r.stderr  # another level 0 on this database: refused, with advice
