"""The Python API, through the real parts: the README's example run as written, then a collection that grows by
`add` (a Ray Data job on the run's cluster), answers every kind of query with typed hits, and loses an image
everywhere on `remove` (the CLI's `remove` too), leaving `verify` clean."""
import contextlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bicascade
from bicascade.errors import BadInputError, NotIndexedError
from bicascade.protocol import Hit
from bicascade.storage import tables

from conftest import cli_json, verified

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"\n## Python\n.*?```python\n(.*?)```", text, re.S).group(1)


def test_the_readmes_python_example_runs_as_written(tiny_db, tmp_path, capsys):
    (tmp_path / "work").mkdir()
    shutil.copytree(tiny_db, tmp_path / "work" / "db")
    with contextlib.chdir(tmp_path):
        exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5, out
    assert all(re.fullmatch(r"-?\d\.\d{3} \S+ \['[\w-]+', '[\w-]+', '[\w-]+'\]", line) for line in out[:3]), out
    assert re.fullmatch(r"3 hits, \d+\.\d{3} GFLOPs of image encoding", out[3]) and out[4].endswith("verify ok: True")


def pictures(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = [folder / f"new-{seed}-{i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
    return paths


def test_a_collection_grows_answers_and_forgets(tiny_db, tmp_path):
    with bicascade.open(tiny_db) as photos:
        before = photos.stats()
        assert before["rows"] > 0 and [lv["coverage"] for lv in before["levels"]][0] == 1.0
        assert len(photos.ladder.levels) == 3 and repr(photos) == f"Collection({tiny_db!r})"
        found = photos.search("a red circle", k=5)
        assert len(found) == 5 and all(isinstance(h, Hit) for h in found)
        assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
        assert all(len(h.levels) == 3 and h.levels[-1].score == h.score for h in found)
        assert found.levels[0].candidates == 50 and found.levels[2].candidates == 14
        shallow = photos.search("a red circle", k=5, depth=1)
        assert all(len(h.levels) == 1 for h in shallow)
        top = found[0]
        assert photos.search(image_id=top.id, k=1)[0].id == top.id  # an image is its own nearest neighbour
        stored = tables.Database(tiny_db).image_bytes([top.id])[top.id]
        picture = tmp_path / "query.png"
        picture.write_bytes(stored)
        assert photos.search(image=picture, k=1)[0].id == top.id
        assert photos.search(image=stored, k=1, depth=2)[0].id == top.id
        only = photos.search("a red circle", k=5, where={"uri_prefix": top.uri})
        assert [h.id for h in only] == [top.id]
        paged = photos.search("a red circle", k=2, offset=2)
        assert [h.id for h in paged] == [h.id for h in found[2:4]]
        with pytest.raises(BadInputError, match="exactly one of query, image or image_id"):
            photos.search("a red circle", image_id=top.id)
        with pytest.raises(BadInputError, match="where: unknown fields"):
            photos.search("a red circle", where={"colour": "red"})
        with pytest.raises(NotIndexedError, match="no indexed image"):
            photos.search(image_id="0" * 32)

        new = pictures(tmp_path / "more", 3, seed=7)
        report = photos.add(tmp_path / "more")
        assert report.new_rows == 3 and report.errors == 0
        assert photos.stats()["rows"] == before["rows"] + 3
        ids = {u: i for i, u in tables.Database(tiny_db).uris(
            tables.Database(tiny_db).column(tables.IMAGES, "id")).items()}
        added = [ids[str(p)] for p in new]
        assert photos.search(image_id=added[0], k=1)[0].id == added[0]  # searchable at once

        removed = photos.remove([top.id], uri_prefix=str(tmp_path / "more" / "new-7-1"))
        assert removed[tables.IMAGES] == 2 and removed[tables.emb_table(photos.ladder.levels[0].fingerprint)] == 2
        assert removed.get(tables.emb_table(photos.ladder.levels[2].fingerprint), 0) >= 1  # its cached vector
        gone = {top.id, added[1]}
        assert not gone & {h.id for h in photos.search("a red circle", k=14)}
        with pytest.raises(NotIndexedError):
            photos.search(image_id=top.id)
        with pytest.raises(BadInputError, match="remove what"):
            photos.remove()
    d = tables.Database(tiny_db)
    for name in d.names():
        if name in (tables.IMAGES, tables.SOURCES) or name.startswith("emb_"):
            assert not gone & d.ids(name), name
    verified(tiny_db)
    doc = cli_json("remove", "--db", tiny_db, "--where", f'{{"uri_prefix": "{tmp_path / "more"}"}}')
    assert doc["removed"][tables.IMAGES] == 2 and bicascade.open(tiny_db).stats()["rows"] == before["rows"] - 1
    verified(tiny_db)
