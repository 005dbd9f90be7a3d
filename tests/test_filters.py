"""Filters on the `images` table, without a server: what each `where` field admits and refuses, and which rows it
keeps (the served path, through HTTP, is in test_product)."""
import dataclasses
import json
from datetime import datetime

import pyarrow as pa
import pytest

from bicascade.errors import BadInputError
from bicascade.storage.filters import MAX_FIELDS, MAX_TEXT, Filter

ROWS = pa.table({
    "id": ["a", "b", "c", "d", "e"],
    "uri": ["/photos/2024/cat.jpg", "/photos/2023/dog.png", "s3://b/photos/2024/x.jpg", "/other/cat.jpg", None],
    "caption": ["A Cat on a sofa", "a dog", None, "two cats", "a CAT"],
    "width": [640, 1024, 300, None, 2000],
    "height": [480, 768, 300, 100, 2000],
    "meta": [json.dumps({"camera": "X100", "year": 2024, "fav": True}), json.dumps({"camera": "Pixel", "year": 2023}),
             "not json", json.dumps([1, 2]), None],
    # capture metadata as the index job stores it (bicascade.exif): the camera's clock, make and model, GPS, type
    "taken": pa.array([datetime(2024, 12, 24, 18, 30), datetime(2024, 12, 25, 0, 0), None,
                       datetime(2023, 7, 1, 9, 0), datetime(2024, 12, 24, 0, 0)], pa.timestamp("us")),
    "camera_make": ["Canon", "Apple", None, "FUJIFILM", None],
    "camera_model": ["EOS R5", "iPhone 15 Pro", None, "X100V", "Pixel 8"],
    "lat": [48.8584, 48.8606, None, 51.5007, -33.8568],  # Eiffel tower, the Louvre, -, Big Ben, Sydney opera
    "lon": [2.2945, 2.3376, None, -0.1246, 151.2153],
    "media_type": ["image/jpeg", "image/heic", "image/jpeg", "image/tiff", None],
})


def kept(where: dict) -> list[str]:
    f = Filter.parse(where)
    ids = [i for i, k in zip(ROWS["id"].to_pylist(), f.mask(ROWS)) if k]
    pushed = f.pushdown(ROWS.column_names)
    if pushed is not None:  # what LanceDB is asked for first never drops a matching row
        assert set(ids) <= set(ROWS.filter(pushed)["id"].to_pylist()), (where, str(pushed))
    return ids


def test_no_filter_is_none():
    assert Filter.parse(None) is None and Filter.parse({}) is None


@pytest.mark.parametrize("where, want", [
    ({"uri_prefix": "/photos/"}, ["a", "b"]),  # a null uri matches nothing
    ({"uri_prefix": "/photos/2024/cat.jpg"}, ["a"]),
    ({"caption": "cat"}, ["a", "d", "e"]),  # case-insensitive substring; a null caption matches nothing
    ({"caption": "CAT ON"}, ["a"]),
    ({"min_width": 640}, ["a", "b", "e"]),  # inclusive; a null width matches nothing
    ({"min_width": 641}, ["b", "e"]),
    ({"min_height": 768}, ["b", "e"]),
    ({"min_height": 0}, ["a", "b", "c", "d", "e"]),
    ({"meta": {"camera": "X100"}}, ["a"]),
    ({"meta": {"camera": ["X100", "Pixel"]}}, ["a", "b"]),  # a list accepts any of its values
    ({"meta": {"year": 2023}}, ["b"]),
    ({"meta": {"fav": True}}, ["a"]),
    ({"meta": {"camera": "X100", "year": 2023}}, []),  # every field must hold
    ({"meta": {"lens": "35mm"}}, []),  # a field no row has; rows without JSON objects never match
    ({"uri_prefix": "/photos/", "caption": "dog", "min_width": 1000, "min_height": 700}, ["b"]),
    ({"taken_after": "2024-12-24"}, ["a", "b", "e"]),  # inclusive: midnight of the 24th is in; no date, never
    ({"taken_after": "2024-12-24T18:30:00.000001"}, ["b"]),
    ({"taken_before": "2024-12-25"}, ["a", "d", "e"]),  # exclusive: midnight of the 25th is out
    ({"taken_after": "2024-12-24 12:00", "taken_before": "2024-12-25T00:00:01"}, ["a", "b"]),
    ({"taken_after": "2024-12-25", "taken_before": "2024-12-24"}, []),  # an empty range matches nothing
    ({"camera": "canon"}, ["a"]),  # a case-insensitive part of "make model"
    ({"camera": "apple iphone"}, ["b"]),
    ({"camera": ["x100", "pixel"]}, ["d", "e"]),  # any of a list; the model alone when the make is unknown
    ({"near": {"lat": 48.8584, "lon": 2.2945, "km": 1}}, ["a"]),  # the Louvre is 3.3 km from the tower
    ({"near": {"lat": 48.8584, "lon": 2.2945, "km": 3.5}}, ["a", "b"]),
    ({"near": {"lat": 48.8584, "lon": 2.2945, "km": 345}}, ["a", "b", "d"]),  # London is 341 km away
    ({"near": {"lat": -33.85, "lon": 151.21, "km": 2}}, ["e"]),
    ({"media_type": "heic"}, ["b"]),  # short names are image/...
    ({"media_type": ["image/jpeg", "TIFF"]}, ["a", "c", "d"]),
    ({"uri_prefix": "/photos/", "taken_after": "2024-01-01", "camera": "EOS", "media_type": "jpeg"}, ["a"]),
])
def test_each_field_keeps_exactly_the_matching_rows(where, want):
    assert kept(where) == want


def test_an_empty_table_gives_an_empty_mask():
    assert len(Filter.parse({"caption": "x"}).mask(ROWS.slice(0, 0))) == 0


@pytest.mark.parametrize("where, message", [
    ("uri_prefix", "where: must be an object"),
    (["uri_prefix"], "where: must be an object"),
    ({"colour": "red"}, "where: unknown fields ['colour']"),
    ({"uri_prefix": ""}, "where.uri_prefix: must be a string"),
    ({"uri_prefix": 3}, "where.uri_prefix: must be a string"),
    ({"caption": "x" * (MAX_TEXT + 1)}, "where.caption: must be a string"),
    ({"min_width": -1}, "where.min_width: must be an integer"),
    ({"min_width": 1_000_001}, "where.min_width: must be an integer"),
    ({"min_height": 1.5}, "where.min_height: must be an integer"),
    ({"min_height": True}, "where.min_height: must be an integer"),
    ({"meta": "camera"}, "where.meta: must be an object"),
    ({"meta": {f"f{i}": 1 for i in range(MAX_FIELDS + 1)}}, "where.meta: must be an object"),
    ({"meta": {"": 1}}, "where.meta.: must be a string"),
    ({"meta": {"n" * 101: 1}}, "where.meta." + "n" * 100 + ": must be a string"),
    ({"meta": {"camera": []}}, "where.meta.camera: must be"),
    ({"meta": {"camera": list(range(101))}}, "where.meta.camera: must be"),
    ({"meta": {"camera": {"a": 1}}}, "where.meta.camera: must be"),
    ({"meta": {"camera": None}}, "where.meta.camera: must be"),
    ({"meta": {"camera": "x" * (MAX_TEXT + 1)}}, "where.meta.camera: must be"),
    ({"taken_after": "yesterday"}, "where.taken_after: must be a date"),
    ({"taken_after": "2024-02-30"}, "where.taken_after: must be a date"),
    ({"taken_before": "2024-12-24T18:30+01:00"}, "where.taken_before: must be a date"),  # offsets: the camera's clock
    ({"taken_before": 20241224}, "where.taken_before: must be a date"),
    ({"camera": ""}, "where.camera: must be a string"),
    ({"camera": [1]}, "where.camera: must be a string"),
    ({"media_type": ["jpeg"] * 101}, "where.media_type: must be a string"),
    ({"near": {"lat": 48.8, "lon": 2.3}}, "where.near: must be"),
    ({"near": {"lat": 91, "lon": 2.3, "km": 1}}, "where.near: must be"),
    ({"near": {"lat": 48.8, "lon": 2.3, "km": 0}}, "where.near: must be"),
    ({"near": {"lat": 48.8, "lon": True, "km": 1}}, "where.near: must be"),
    ({"near": {"lat": float("nan"), "lon": 2.3, "km": 1}}, "where.near: must be"),
    ({"near": [48.8, 2.3, 1]}, "where.near: must be"),
])
def test_bad_filters_name_the_field(where, message):
    with pytest.raises(BadInputError) as e:
        Filter.parse(where)
    assert str(e.value).startswith(message), str(e.value)


def test_the_documented_bounds_are_the_enforced_ones():
    assert (MAX_TEXT, MAX_FIELDS) == (500, 16)  # what serve/app.py's schema (the `Where` model) publishes


def test_a_parsed_filter_cannot_change_under_the_router_that_caches_its_matches():
    f = Filter.parse({"caption": "cat"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.caption = "dog"


def test_the_bounds_themselves_are_accepted():
    f = Filter.parse({"uri_prefix": "x" * MAX_TEXT, "caption": "c", "min_width": 0, "min_height": 1_000_000,
                      "meta": {**{f"f{i}": "v" for i in range(MAX_FIELDS - 1)}, "n" * 100: list(range(100))}})
    assert f.min_height == 1_000_000 and len(f.meta) == MAX_FIELDS and f.meta["n" * 100] == list(range(100))
    assert Filter.parse({"meta": {"camera": "x" * MAX_TEXT}}).meta == {"camera": "x" * MAX_TEXT}
    assert Filter.parse({"meta": {"ok": [1, 2.5, False, "s"]}}).meta == {"ok": [1, 2.5, False, "s"]}


def test_equal_filters_share_a_key_and_different_ones_do_not():
    a = Filter.parse({"caption": "cat", "meta": {"x": 1, "y": 2}})
    assert a.key() == Filter.parse({"meta": {"y": 2, "x": 1}, "caption": "cat"}).key()
    keys = {Filter.parse(w).key() for w in ({"caption": "cat"}, {"uri_prefix": "cat"}, {"min_width": 1},
                                              {"min_height": 1}, {"meta": {"caption": "cat"}},
                                              {"taken_after": "2024-01-01"}, {"taken_before": "2024-01-01"},
                                              {"camera": "cat"}, {"media_type": "cat"},
                                              {"near": {"lat": 1, "lon": 2, "km": 3}},
                                              {"near": {"lat": 1, "lon": 2, "km": 4}})}
    assert len(keys) == 11


@pytest.mark.parametrize("where, exact", [
    ({"uri_prefix": "/photos/", "min_width": 700, "media_type": "heic"}, ["b"]),
    ({"taken_after": "2024-12-24", "taken_before": "2024-12-25"}, ["a", "e"]),
    ({"near": {"lat": 48.8584, "lon": 2.2945, "km": 345}}, ["a", "b", "d"]),  # here the band of latitude is exact
])
def test_the_pushed_down_conditions_alone_keep_what_they_can_decide(where, exact):
    f = Filter.parse(where)
    assert ROWS.filter(f.pushdown(ROWS.column_names))["id"].to_pylist() == exact


def test_conditions_no_index_decides_are_not_pushed_down_nor_are_columns_a_table_lacks():
    unindexable = Filter.parse({"caption": "cat", "camera": "canon", "meta": {"year": 2024}})
    assert unindexable.pushdown(ROWS.column_names) is None
    assert Filter.parse({"taken_after": "2024-01-01"}).pushdown(["id", "uri"]) is None  # an older database


def test_a_large_table_answers_filters_from_its_scalar_indexes(tmp_path):
    """Real LanceDB: a folder goes to LanceDB's scalar index (the plan says so), and the matches are the same as
    without it, and the same as the whole filter computed in memory."""
    from bicascade.storage import filters, tables

    db = tables.Database(str(tmp_path / "db"))
    db.append(tables.IMAGES, tables.IMAGES_SCHEMA, ROWS.to_pylist())
    wheres = [{"uri_prefix": "/photos/"}, {"taken_after": "2024-12-24", "camera": "canon"},
              {"near": {"lat": 48.8584, "lon": 2.2945, "km": 3.5}, "media_type": ["jpeg", "heic"]},
              {"min_width": 640, "min_height": 480, "caption": "cat"}]
    before = [filters.matching(db, Filter.parse(w)) for w in wheres]
    assert filters.build_indexes(db, min_rows=ROWS.num_rows + 1) == []  # a small table is read whole
    assert filters.build_indexes(db, min_rows=ROWS.num_rows) == list(filters.INDEXED)
    assert [filters.matching(db, Filter.parse(w)) for w in wheres] == before == [kept(w) for w in wheres]
    dataset = db.dataset(tables.IMAGES)
    for where in wheres:  # only a folder is answered by an index (bench/filters.py says why)
        plan = dataset.scanner(columns=["id"], filter=Filter.parse(where).pushdown(dataset.schema.names))
        assert ("ScalarIndexQuery" in plan.explain_plan()) == ("uri_prefix" in where), (where, plan.explain_plan())
