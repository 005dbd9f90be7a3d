"""Vectorised cascade evaluation equals Algorithm 1 per query; eval on a tiny trained ladder."""
from pathlib import Path

import numpy as np
import pytest

from bicascade import images, models, query
from bicascade.cascade import Cascade, ExactIndex, Level
from bicascade.errors import BadInputError, NotIndexedError
from bicascade.pipelines.lab import train
from bicascade.pipelines.measure import evaluate
from bicascade.storage import tables


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_cascade_topk_equals_algorithm_1():
    rng = np.random.default_rng(0)
    n, dims = 400, (8, 16, 24)
    images = [unit(rng.normal(size=(n, d))) for d in dims]
    texts = [unit(rng.normal(size=(30, d))) for d in dims]
    top = evaluate.cascade_topk(texts, images, [50, 14], 10)
    ids = [f"{i:05d}" for i in range(n)]  # zero-padded: id order == index order, as in the stable sort
    for q in range(30):
        levels = [Level(f"L{j}", encode_text=lambda t, j=j, q=q: texts[j][[q]],
                        encode_images=lambda xs, j=j: images[j][[int(x) for x in xs]]) for j in range(3)]
        out = Cascade(ExactIndex(ids, images[0]), levels, [50, 14]).search("q", k=10)
        assert [int(r.id) for r in out.results] == top[q].tolist()


def test_recall():
    topk = np.array([[3, 1, 2] + [9] * 7, [0] * 10])
    assert evaluate.recall(topk, np.array([[1], [5]])) == {"1": 0.0, "5": 0.5, "10": 0.5}
    # several relevant images (-1 pads): a query counts once, at its best-ranked relevant image
    assert evaluate.recall(topk, np.array([[2, 3], [7, -1]])) == {"1": 0.5, "5": 0.5, "10": 0.5}


def test_labelled_queries_name_images_by_id_uri_or_path(tmp_path):
    """A user's queries file: an image by id, by the uri it was indexed from, or by a path relative to the file (a
    duplicate's uri is in the ingest ledger only); every mistake names its line."""
    db = tables.Database(str(tmp_path / "db"))
    db.append(tables.IMAGES, tables.IMAGES_SCHEMA, [{"id": i, "uri": str(tmp_path / f"{i}.jpg")} for i in "abc"])
    db.append(tables.SOURCES, tables.SOURCES_SCHEMA, [{"uri": str(tmp_path / f"{i}.jpg"), "id": i} for i in "abc"]
              + [{"uri": str(tmp_path / "copy-of-a.jpg"), "id": "a"}])
    labels = tmp_path / "labels.jsonl"
    labels.write_text(f'{{"query": "one", "relevant": ["b"]}}\n\n{{"query": "two", "relevant": ["c.jpg", '
                      f'"copy-of-a.jpg", "{tmp_path / "a.jpg"}"]}}\n')
    held = evaluate.labelled_heldout(db, labels)
    assert held.queries == ["one", "two"] and held.paths is None
    assert [[held.ids[i] if i >= 0 else None for i in row] for row in held.relevant] == [["b", None], ["c", "a"]]
    for text, match in (("not json", r"labels.jsonl:1: not JSON"), ('{"query": "x"}', r"labels.jsonl:1: expected"),
                        ('{"query": "x", "relevant": ["b"]}\n{"query": "y", "relevant": ["nowhere.jpg"]}',
                         r"labels.jsonl:2: relevant image 'nowhere.jpg' is not in"),
                        ("\n", "holds no queries")):
        labels.write_text(text)
        with pytest.raises(BadInputError, match=match):
            evaluate.labelled_heldout(db, labels)
    with pytest.raises(BadInputError, match="cannot read"):
        evaluate.labelled_heldout(db, tmp_path / "missing.jsonl")


@pytest.fixture(autouse=True)
def isolated_cache():  # the module shares tiny_db's cache
    yield


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_eval_on_tiny_ladder(tiny_db):
    ladder, root = train.ensure_ladder("synthetic-tiny")
    resolved = query.registered(ladder.name)
    held = evaluate.world_heldout(root)
    report = evaluate.evaluate(held, resolved, cutoffs=(50, 14))
    assert report.queries == 3 * report.images == 900
    assert [lv.model for lv in report.levels] == list(ladder.levels)
    assert [c.m for c in report.cascades] == [[50], [50], [50, 14]]
    for row in report.levels + report.cascades:
        r = row.recall
        assert 0 <= r["1"] <= r["5"] <= r["10"] <= 1
    assert report.levels[-1].recall["10"] > 10 / 300  # better than chance
    assert all(c.f_life > 1 for c in report.cascades)
    # cutoffs covering the whole pool: the cascade is the top level
    full = evaluate.evaluate(held, resolved, cutoffs=(300, 299))
    assert full.cascades[0].recall["10"] == pytest.approx(full.levels[-1].recall["10"])

    # level 0 read from the index: the same vectors the index job stored, so the same recall
    with pytest.raises(NotIndexedError, match=r"index \S+ first \(bicascade index"):
        evaluate.evaluate(held, resolved, db=str(root / "no-db"))
    stored = evaluate.evaluate(held, resolved, db=tiny_db)
    assert stored.db == tiny_db and report.db is None
    assert evaluate.world_of(tables.Database(tiny_db), None) == root  # the world the db indexed
    for a, b in zip(stored.levels + stored.cascades, report.levels + report.cascades):
        assert a.recall == pytest.approx(b.recall, abs=1 / 900)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_one_file_gives_one_vector_through_the_index_job_and_eval(tiny_db, tmp_path):
    """The single image path: a photo-like file (EXIF-rotated, with alpha, 16-bit...) decoded by the index job and by
    eval gives the same level-0 vector."""
    from PIL import Image

    from bicascade.pipelines.ingest import index

    rng = np.random.default_rng(3)
    folder = tmp_path / "files"
    folder.mkdir()
    base = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    base.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", quality=90, exif=exif)
    rgba = base.convert("RGBA")
    rgba.putalpha(100)
    rgba.save(folder / "alpha.png")
    Image.fromarray((rng.integers(0, 65535, (60, 70))).astype(np.uint16)).save(folder / "deep.png")
    paths = sorted(str(p) for p in folder.iterdir())
    db = str(tmp_path / "db")
    try:
        index.run_index(str(folder), db, "synthetic-tiny")
    finally:
        import ray
        ray.shutdown()
    level0 = query.registered("synthetic-tiny").levels[0]
    ids = [images.content_id(Path(p).read_bytes()) for p in paths]
    stored = tables.Database(db).vectors(level0.fingerprint, ids)
    fresh = evaluate.embed_images(models.load_model(level0.spec, device="cpu"), paths)
    np.testing.assert_allclose(stored, fresh, atol=1e-5)
