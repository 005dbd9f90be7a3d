"""A new user's path, through the real parts: their own CLIP checkpoints (two standard open_clip architectures saved
from random init) made a ladder from the command line, a folder of real photographs as phones and cameras write
them, `bicascade index` once with `--ladder`, then `search` and `serve` on that database without it, and `plan` and
`eval` on their own labelled queries."""
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from bicascade import images, models, query
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


def test_plan_and_eval_measure_the_users_own_labelled_queries(user):
    """`plan --labels` and `eval --labels` measure recall on the user's queries over their own database (no world):
    the top level's recall is what ranking the whole database with it gives, and the chosen cascade evaluates to the
    recall the plan reported. Images are named by path (relative to the file), by the uri indexed or by id."""
    root, files, _, _ = user
    db = tables.Database(str(root / "db"))
    ledger = db.dataset(tables.SOURCES).to_table(columns=["uri", "id"]).to_pylist()
    id_of = {r["uri"]: r["id"] for r in ledger}
    rows = [{"query": f"a photo of {name.replace('_', ' ')}", "relevant": [str(p.relative_to(root)) for p in paths]}
            for name, paths in files.items()]
    names = list(files)
    rows[0]["relevant"] = [id_of[str(p)] for p in files[names[0]]]  # by id
    rows[1]["relevant"] = [str(p) for p in files[names[1]]]  # by the uri indexed (an absolute path)
    labels = root / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    planned = cli_json("plan", "--db", str(root / "db"), "--labels", str(labels), "--queries", "200",
                       "--recall-loss", "100", "--at", "1")
    assert planned["queries"] == len(rows) and planned["chosen"] is not None and planned["at"] == 1

    ids = db.column(tables.IMAGES, "id")
    top = models.load_model("mine/ViT-S-16", device="cpu")
    scores = top.encode_texts([r["query"] for r in rows]) @ query.encode_stored(top, db, ids).T
    ranked = np.argsort(-scores, axis=1, kind="stable")
    relevant = [{ids.index(id_of[str(p)]) for p in paths} for paths in files.values()]
    expected = {str(k): np.mean([bool(set(ranked[q, :k]) & relevant[q]) for q in range(len(rows))])
                for k in (1, 5, 10)}
    assert planned["reference"]["recall"] == pytest.approx(expected)

    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(planned))
    evaluated = cli_json("eval", "--db", str(root / "db"), "--labels", str(labels), "--plan", str(plan_file))
    assert (evaluated["queries"], evaluated["images"]) == (len(rows), len(ids))
    assert evaluated["levels"][-1]["recall"] == pytest.approx(planned["reference"]["recall"])
    assert evaluated["cascades"][-1]["cascade"] == planned["chosen"]["cascade"]
    assert evaluated["cascades"][-1]["recall"] == pytest.approx(planned["chosen"]["recall"])

    r = cli("eval", "--db", str(root / "db"), check=False)  # no world behind this database: says how to label
    assert r.returncode == 2 and "--labels FILE" in r.stderr
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"query": "a photo of a cat", "relevant": ["photos/nowhere.jpg"]}) + "\n")
    r = cli("plan", "--db", str(root / "db"), "--labels", str(bad), check=False)
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr and "nowhere.jpg" in r.stderr


def test_a_cheap_level_of_the_users_own_vit_without_training(user):
    """`#keep=F` makes the user's ViT-S-16 a level on a quarter of its patch tokens: cheaper, one text tower with the
    full model, and a ladder that indexes and searches like any other."""
    root, files, _, _ = user
    ckpt = root / "ViT-S-16.pt"
    added = cli_json("ladders", "add", "mine-free", f"ViT-S-16={ckpt}#keep=0.25", f"ViT-S-16={ckpt}")
    assert [lv["model"] for lv in added["levels"]] == ["mine-free/ViT-S-16-p25", "mine-free/ViT-S-16"]
    assert added["shared_text_tower"] and added["levels"][0]["gflops"] < 0.4 * added["levels"][1]["gflops"]
    db = str(root / "db-free")
    indexed = cli_json("index", str(root / "photos"), "--db", db, "--ladder", "mine-free")
    assert indexed["errors"] == 0 and indexed["rows"] == sum(len(v) for v in files.values())
    found = cli_json("search", "a cat on a sofa", "--db", db, "--k", "3")
    assert [lv["model"] for lv in found["stats"]["levels"]] == ["mine-free/ViT-S-16-p25", "mine-free/ViT-S-16"]
    assert len(found["results"]) == 3
