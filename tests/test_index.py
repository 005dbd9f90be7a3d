"""The index job through real Ray Data + LanceDB: bad input, duplicates, resume after SIGKILL, new fingerprints."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from bicascade import images, models, query, registry
from bicascade.errors import BadInputError, MissingWeightsError
from bicascade.pipelines.ingest import index
from bicascade.pipelines.lab import train
from bicascade.storage import tables

from conftest import cli

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
LADDER = "synthetic-tiny"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(tiny_session):
    from conftest import cache_at

    with cache_at(tiny_session[0]):  # the run's tiny ladder, trained once
        yield
        ray.shutdown()


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares one cache: the tiny ladder trains once
    yield


def picture(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def save(im, path, **kw):
    im.save(path, **kw)
    return path


def bad_corpus(root):
    root.mkdir()
    good = [save(picture(i), root / f"good{i}.png") for i in range(6)]
    save(picture(10), root / "photo.jpg", quality=90)
    (root / "copy.png").write_bytes(good[0].read_bytes())  # the same image twice
    (root / "empty.jpg").write_bytes(b"")
    jpg = io.BytesIO()
    picture(11, (200, 200)).save(jpg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (root / "notes.jpg").write_text("this is not an image")
    save(Image.new("1", (10000, 8000)), root / "bomb.png")  # 80 MP declared, a few KB on disk
    save(picture(12).convert("CMYK"), root / "cmyk.jpg")
    deep = np.random.default_rng(13).integers(0, 65535, (30, 40)).astype(np.uint16)
    save(Image.fromarray(deep), root / "deep16.png")
    save(picture(14).convert("P"), root / "palette.png")
    frames = [picture(15 + i) for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    la = picture(18).convert("LA")
    save(la, root / "la.png")
    rgba = picture(19).convert("RGBA")
    rgba.putalpha(128)
    save(rgba, root / "rgba.png")
    (root / "sub").mkdir()
    save(picture(20), root / "sub" / "nested.webp")
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


def read(db_uri, name):
    return lancedb.connect(db_uri).open_table(name).to_arrow().to_pylist()


def test_bad_input_is_recorded_and_good_images_indexed(tmp_path):
    corpus = bad_corpus(tmp_path / "corpus")
    db = str(tmp_path / "db")
    doc = index.run_index(str(corpus), db, LADDER).to_json()
    good = {"good0.png", "good1.png", "good2.png", "good3.png", "good4.png", "good5.png", "photo.jpg", "cmyk.jpg",
            "deep16.png", "palette.png", "anim.gif", "la.png", "rgba.png", "nested.webp"}
    bad = {"empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png"}
    images = read(db, tables.IMAGES)
    names = {os.path.basename(r["uri"]) for r in images}
    assert names - {"good0.png", "copy.png"} == good - {"good0.png"}
    assert len(names & {"good0.png", "copy.png"}) == 1  # the same bytes twice: one row, whichever came first
    assert doc["rows"] == doc["new_rows"] == len(good) and doc["errors"] == len(bad)
    assert len({r["id"] for r in images}) == len(images)
    errors = {os.path.basename(r["uri"]): r for r in read(db, tables.ERRORS)}
    assert set(errors) == bad
    assert "empty" in errors["empty.jpg"]["error"] and "bomb" in errors["bomb.png"]["error"]
    assert all(e["stage"] == "decode" and e["error"] for e in errors.values())
    by_name = {os.path.basename(r["uri"]): r for r in images}
    assert (by_name["anim.gif"]["width"], by_name["anim.gif"]["height"]) == (40, 30)
    assert Image.open(io.BytesIO(by_name["cmyk.jpg"]["bytes"])).size == (40, 30)
    vectors = np.array([r["vector"] for r in read(db, doc["table"])])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    # rerun: nothing new, nothing re-encoded, and nothing rebuilt (what each idle pass of --watch is)
    versions = [tables.Database(db).version(name) for name in (tables.IMAGES, doc["table"])]
    again = index.run_index(str(corpus), db).to_json()  # the database remembers its ladder
    assert (again["rows"], again["new_rows"], again["errors"]) == (len(good), 0, 0)
    assert [tables.Database(db).version(name) for name in (tables.IMAGES, doc["table"])] == versions
    assert again["skipped"] == len(good) + 1 + len(bad) and again["ladder"] == LADDER


@pytest.mark.parametrize("size", [32, (32, 32)])
def test_decode_batch_pads_bad_rows_to_the_model_size(tmp_path, size):
    # open_clip reports an int size for ResNet towers (the default ladder) and a pair for ViTs
    save(picture(1), tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    cfg = {**models.preprocessing(registry.get_model(train.level_names(train.PROFILES[LADDER])[0]))[0], "size": size}
    uris = np.array([str(tmp_path / "ok.png"), str(tmp_path / "bad.jpg")])
    out = index.decode_batch({"uri": uris}, cfg, set(), set())
    assert out["pixels"].shape == (2, 32, 32, 3) and out["pixels"].dtype == np.uint8
    assert list(out["status"]) == ["new", "error"] and not out["pixels"][1].any()


def test_vectors_match_the_model(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    paths = [save(picture(i), corpus / f"{i}.png") for i in range(5)]
    doc = index.run_index(str(corpus), str(tmp_path / "db"), LADDER)
    rows = {r["id"]: np.array(r["vector"]) for r in read(str(tmp_path / "db"), doc.table)}
    model = models.load_model(registry.get_model(train.level_names(train.PROFILES[LADDER])[0]), device="cpu")
    expect = model.encode_images([Image.open(p).convert("RGB") for p in paths])
    for p, e in zip(paths, expect):
        np.testing.assert_allclose(rows[images.content_id(p.read_bytes())], e, atol=1e-5)
    assert doc.table == tables.emb_table(model.fingerprint)


def test_parquet_and_tar_sources(tmp_path):
    imgs = [picture(i) for i in range(4)]
    blobs = []
    for im in imgs:
        b = io.BytesIO()
        im.save(b, "PNG")
        blobs.append(b.getvalue())
    pq.write_table(pa.table({"image": blobs, "caption": [f"cap {i}" for i in range(4)], "score": [0.1, 0.2, 0.3, 0.4]}),
                   tmp_path / "bytes.parquet")
    (tmp_path / "paths").mkdir()
    for i, im in enumerate(imgs[:2]):
        im.save(tmp_path / "paths" / f"{i}.png")
    pq.write_table(pa.table({"path": ["0.png", "1.png", "missing.png"], "caption": ["a", "b", "c"]}),
                   tmp_path / "paths" / "index.parquet")
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "000.tar", "w") as tar:
        for i, blob in enumerate(blobs):
            for name, data in ((f"s{i}.png", blob), (f"s{i}.txt", f"tar caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    db = str(tmp_path / "db")
    d1 = index.run_index(str(tmp_path / "bytes.parquet"), db, LADDER)
    assert (d1.rows, d1.new_rows) == (4, 4)
    rows = {r["caption"]: r for r in read(db, tables.IMAGES)}
    assert json.loads(rows["cap 2"]["meta"]) == {"score": 0.3}
    d2 = index.run_index(str(tmp_path / "paths"), db, LADDER)  # same bytes as two parquet rows: no new rows
    assert (d2.new_rows, d2.errors) == (0, 1)
    assert [e["stage"] for e in read(db, tables.ERRORS)] == ["read"]
    d3 = index.run_index(str(tmp_path / "shards"), db, LADDER)
    assert d3.new_rows == 0 and d3.rows == 4


def test_missing_and_empty_sources(tmp_path):
    r = cli("index", str(tmp_path / "nope"), "--db", str(tmp_path / "db"), "--ladder", LADDER, check=False)
    assert r.returncode == 2 and "source does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="source has no images"):
        index.run_index(str(tmp_path / "empty"), str(tmp_path / "db"), LADDER)


def test_a_new_database_needs_a_ladder_and_then_remembers_it(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        picture(i).save(corpus / f"{i}.png")
    db = str(tmp_path / "db")
    r = cli("index", str(corpus), "--db", db, check=False)  # nothing falls back to a default ladder
    assert r.returncode == 2 and "--ladder NAME" in r.stderr and "ladders add" in r.stderr
    assert "synthetic-tiny" in r.stderr  # the known ladders are listed
    assert not os.path.exists(os.path.join(db, f"{tables.IMAGES}.lance"))
    index.run_index(str(corpus), db, LADDER)
    remembered = query.open_ladder(tables.Database(db), None)
    assert remembered.name == LADDER and remembered.names == list(registry.get_ladder(LADDER).levels)
    # a ladder with another level 0 is refused, saying what to do instead
    registry.register_ladder(registry.Ladder("other-level0", (registry.get_ladder(LADDER).levels[1],)))
    with pytest.raises(BadInputError, match="index into a new database, or use a ladder whose level 0"):
        index.run_index(str(corpus), db, "other-level0")
    # the same level 0 under other upper levels is allowed, and becomes the database's ladder
    levels = registry.get_ladder(LADDER).levels
    registry.register_ladder(registry.Ladder("same-level0", (levels[0], levels[2])))
    assert index.run_index(str(corpus), db, "same-level0").new_rows == 0
    assert query.open_ladder(tables.Database(db), None).names == [levels[0], levels[2]]


@pytest.mark.slow
def test_sigkill_midrun_then_resume(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(600):
        picture(i, (24, 24)).save(corpus / f"{i:04d}.png")
    (corpus / "dup.png").write_bytes((corpus / "0000.png").read_bytes())
    db = str(tmp_path / "db")
    cmd = [sys.executable, "-c", "import sys; from bicascade.pipelines.ingest import index; "
           "index.run_index(sys.argv[1], sys.argv[2], 'synthetic-tiny', "
           "index.IndexConfig(batch_size=16, flush_rows=32))",
           str(corpus), db]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.isdir(os.path.join(db, f"{tables.SOURCES}.lance")) and len(read(db, tables.SOURCES)) >= 64:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray cluster
    proc.wait(timeout=30)
    partial = len(read(db, tables.SOURCES))
    assert 0 < partial < 601, "the kill should land mid-run"
    doc = index.run_index(str(corpus), db, LADDER)
    ids = [r["id"] for r in read(db, tables.IMAGES)]
    assert len(ids) == len(set(ids)) == 600 == doc.rows
    emb = [r["id"] for r in read(db, doc.table)]
    assert len(emb) == len(set(emb)) == 600
    assert doc.skipped >= partial - 32


def test_changed_weights_key_a_new_table_and_a_recorded_checkpoint_must_not_change(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        picture(i).save(corpus / f"{i}.png")
    db = str(tmp_path / "db")
    first = index.run_index(str(corpus), str(tmp_path / "db0"), LADDER)
    spec = registry.get_model(train.level_names(train.PROFILES[LADDER])[0])
    loaded = models.load_model(spec, device="cpu")
    import torch
    with torch.no_grad():
        loaded.model.visual.proj.mul_(-1)
    ckpt = models.save_checkpoint(loaded.model, tmp_path / "changed.pt")
    registry.register_model(models.ModelSpec("changed", spec.arch, checkpoint=str(ckpt)))
    registry.register_ladder(registry.Ladder("changed-ladder", ("changed",)))
    second = index.run_index(str(corpus), db, "changed-ladder")
    assert second.table != first.table and second.rows == 3
    with torch.no_grad():  # the recorded checkpoint is overwritten with other weights: a clear error, not stale vectors
        loaded.model.visual.proj.mul_(2)
    models.save_checkpoint(loaded.model, ckpt)
    with pytest.raises(MissingWeightsError, match="changed since"):
        query.open_ladder(tables.Database(db), None)


def test_capture_metadata_is_indexed_as_typed_columns_and_filters_every_search(tmp_path):
    """Phone and camera files of every kind: what their EXIF says lands in typed columns (a file that says nothing
    gets nulls, a broken EXIF block a warning, never an error), and `where` filters on it before level 0 ranks. A
    database indexed before these columns existed gets them as nulls on its next run, and filters read it meanwhile."""
    from datetime import datetime, timedelta

    from test_images import camera_exif

    import bicascade
    from bicascade.storage import filters

    root = tmp_path / "library"
    (root / "2024" / "paris").mkdir(parents=True)
    (root / "2023").mkdir()
    save(picture(1, (64, 48)), root / "2024" / "paris" / "tower.jpg", quality=92, exif=camera_exif(orientation=6))
    save(picture(2, (64, 48)), root / "2024" / "paris" / "louvre.heic", quality=90,
         exif=camera_exif(taken="2024:12:26 10:00:00", offset="+01:00", make="Apple", model="iPhone 15 Pro",
                          gps=("N", (48.0, 51.0, 38.2), "E", (2.0, 20.0, 15.4))))
    save(picture(3, (64, 48)), root / "2023" / "scan.png")  # no EXIF at all
    save(picture(4, (64, 48)), root / "2023" / "old.tif", exif=camera_exif(make="NIKON", model="D850"))
    broken = bytearray((save(picture(5, (64, 48)), root / "2023" / "broken.jpg", quality=90,
                             exif=camera_exif())).read_bytes())
    at = broken.find(b"Exif\x00\x00")
    broken[at + 20:at + 60] = b"\xff" * 40
    (root / "2023" / "broken.jpg").write_bytes(bytes(broken))
    db = str(tmp_path / "db")
    doc = index.run_index(str(root), db, LADDER)
    assert (doc.new_rows, doc.errors) == (5, 0)
    rows = {os.path.basename(r["uri"]): r for r in read(db, tables.IMAGES)}
    tower, louvre, scan = rows["tower.jpg"], rows["louvre.heic"], rows["scan.png"]
    assert (tower["taken"], tower["taken_offset"], tower["camera_make"], tower["camera_model"]) == \
        (datetime(2024, 12, 24, 18, 30), 60, "Canon", "EOS R5")
    assert (tower["width"], tower["height"], tower["media_type"]) == (48, 64, "image/jpeg")  # upright
    assert (tower["lat"], tower["lon"]) == pytest.approx((48.8584, 2.2945), abs=1e-4)
    assert tower["file_size"] == (root / "2024" / "paris" / "tower.jpg").stat().st_size
    modified = datetime.fromtimestamp((root / "2024" / "paris" / "tower.jpg").stat().st_mtime).astimezone()
    assert abs(tower["modified"] - modified) < timedelta(seconds=1)
    assert (louvre["media_type"], louvre["camera_model"]) == ("image/heic", "iPhone 15 Pro")
    assert scan["media_type"] == "image/png" and all(scan[k] is None for k in (
        "taken", "taken_offset", "camera_make", "camera_model", "lens", "lat", "lon"))
    assert (rows["old.tif"]["media_type"], rows["old.tif"]["camera_make"]) == ("image/tiff", "NIKON")
    assert rows["broken.jpg"]["camera_make"] is None
    warned = [e for e in read(db, tables.ERRORS) if e["stage"] == "metadata"]
    assert [os.path.basename(e["uri"]) for e in warned] == ["broken.jpg"] and "malformed EXIF" in warned[0]["error"]

    photos = bicascade.open(db)

    def found(where: dict) -> set[str]:
        return {os.path.basename(h.uri) for h in photos.search("a photo", k=10, where=where)}
    assert found({"camera": "canon"}) == {"tower.jpg"}
    # the broken block lost IFD0 (make, model) but its GPS directory still reads: kept
    assert found({"near": {"lat": 48.8584, "lon": 2.2945, "km": 5}}) == {"tower.jpg", "louvre.heic", "broken.jpg"}
    assert found({"near": {"lat": 48.8584, "lon": 2.2945, "km": 1}}) == {"tower.jpg", "broken.jpg"}
    assert found({"taken_after": "2024-12-25"}) == {"louvre.heic"}
    assert found({"media_type": ["heic", "png"]}) == {"louvre.heic", "scan.png"}
    assert found({"uri_prefix": str(root / "2023") + "/", "camera": "nikon"}) == {"old.tif"}
    r = cli("search", "a photo", "--db", db, "--k", "3", "--json", "--where", '{"camera": "iphone"}')
    assert [os.path.basename(h["uri"]) for h in json.loads(r.stdout)["results"]] == ["louvre.heic"]

    # an older database: the capture columns are gone; filters read nulls, the next index run adds them back
    lancedb.connect(db).open_table(tables.IMAGES).drop_columns(["taken", "camera_make", "lat", "media_type"])
    older = tables.Database(db)
    assert filters.matching(older, filters.Filter.parse({"camera": "EOS"})) == [tower["id"]]  # the model is left
    assert filters.matching(older, filters.Filter.parse({"taken_after": "2000-01-01"})) == []
    save(picture(6, (64, 48)), root / "2024" / "new.jpg", quality=90, exif=camera_exif(make="Sony", model="A7"))
    assert index.run_index(str(root), db).new_rows == 1
    rows = {os.path.basename(r["uri"]): r for r in read(db, tables.IMAGES)}
    assert rows["new.jpg"]["camera_make"] == "Sony" and rows["tower.jpg"]["camera_make"] is None


def test_sync_keeps_an_image_whose_bytes_live_on_at_another_path(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    a = save(picture(1), root / "a.png")
    (root / "b.png").write_bytes(a.read_bytes())  # the same image at two paths: one row
    save(picture(2), root / "c.png")
    db = str(tmp_path / "db")
    first = index.run_index(str(root), db, LADDER, index.IndexConfig(sync=True))
    assert (first.new_rows, first.gone, first.changed, first.removed) == (2, 0, 0, 0)
    kept_id = {os.path.basename(r["uri"]): r["id"] for r in read(db, tables.SOURCES)}["a.png"]
    a.unlink()
    (root / "c.png").unlink()
    second = index.run_index(str(root), db, config=index.IndexConfig(sync=True))
    assert (second.new_rows, second.gone, second.changed, second.removed) == (0, 2, 0, 1)
    images = read(db, tables.IMAGES)
    assert [(r["id"], os.path.basename(r["uri"])) for r in images] == [(kept_id, "b.png")]  # now under b.png
    assert [os.path.basename(r["uri"]) for r in read(db, tables.SOURCES)] == ["b.png"]
    assert index.run_index(str(root), db, config=index.IndexConfig(sync=True)).gone == 0  # nothing left to do
    r = cli("verify", "--db", db, "--json", check=False)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout[-2000:]
    pq.write_table(pa.table({"bytes": [a.read_bytes() if a.exists() else b"x"]}), tmp_path / "rows.parquet")
    with pytest.raises(BadInputError, match="--sync keeps a folder"):
        index.run_index(str(tmp_path / "rows.parquet"), db, config=index.IndexConfig(sync=True))
