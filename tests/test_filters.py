"""Filters on the `images` table, without a server: what each `where` field admits and refuses, and which rows it
keeps (the served path, through HTTP, is in test_product)."""
import dataclasses
import json

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
})


def kept(where: dict) -> list[str]:
    f = Filter.parse(where)
    return [i for i, k in zip(ROWS["id"].to_pylist(), f.mask(ROWS)) if k]


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
                                              {"min_height": 1}, {"meta": {"caption": "cat"}})}
    assert len(keys) == 5
