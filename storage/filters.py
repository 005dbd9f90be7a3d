"""Filters on the `images` table for filtered search: a small, validated vocabulary (uri prefix, caption text, size,
metadata fields) evaluated with pyarrow compute over the table's columns. User input is only ever a value compared
with a column, never text spliced into a query string."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bicascade.errors import BadInputError

if TYPE_CHECKING:
    from bicascade.storage import tables

MAX_TEXT = 500  # longest prefix / substring / metadata value a filter takes
MAX_FIELDS = 16
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Filter:
    """All conditions must hold. `meta` compares fields of the JSON metadata a source carried (parquet columns,
    webdataset .json) for equality; a field may be given a list of accepted values."""

    uri_prefix: str | None = None
    caption: str | None = None  # case-insensitive substring of the caption
    min_width: int | None = None
    min_height: int | None = None
    meta: dict[str, Scalar | list[Scalar]] = field(default_factory=dict)

    COLUMNS = ("id", "uri", "caption", "width", "height", "meta")

    @classmethod
    def parse(cls, doc: dict[str, Any] | None) -> Filter | None:
        """A filter from a request's `where` object, checked field by field (BadInputError names the bad one)."""
        if not doc:
            return None
        if not isinstance(doc, dict):
            raise BadInputError("where: must be an object")
        unknown = set(doc) - {"uri_prefix", "caption", "min_width", "min_height", "meta"}
        if unknown:
            raise BadInputError(f"where: unknown fields {sorted(unknown)} (uri_prefix, caption, min_width, min_height, "
                                "meta)")
        for key in ("uri_prefix", "caption"):
            if key in doc and (not isinstance(doc[key], str) or not 0 < len(doc[key]) <= MAX_TEXT):
                raise BadInputError(f"where.{key}: must be a string of 1 to {MAX_TEXT} characters")
        for key in ("min_width", "min_height"):
            if key in doc and (type(doc[key]) is not int or not 0 <= doc[key] <= 1_000_000):
                raise BadInputError(f"where.{key}: must be an integer between 0 and 1000000")
        meta = doc.get("meta", {})
        if not isinstance(meta, dict) or len(meta) > MAX_FIELDS:
            raise BadInputError(f"where.meta: must be an object of at most {MAX_FIELDS} fields")
        for name, value in meta.items():
            values = value if isinstance(value, list) else [value]
            if not 0 < len(name) <= 100 or not values or len(values) > 100 or not all(_scalar(v) for v in values):
                raise BadInputError(f"where.meta.{name[:100]}: must be a string, number or boolean (or a list of up to "
                                    f"100), strings up to {MAX_TEXT} characters")
        return cls(doc.get("uri_prefix"), doc.get("caption"), doc.get("min_width"), doc.get("min_height"), dict(meta))

    def key(self) -> str:
        return json.dumps([self.uri_prefix, self.caption, self.min_width, self.min_height, self.meta], sort_keys=True)

    def mask(self, rows: pa.Table) -> np.ndarray:
        """Which rows (of a table with `COLUMNS`) match."""
        keep = np.ones(rows.num_rows, bool)
        if self.uri_prefix is not None:
            keep &= _bools(pc.starts_with(rows["uri"], pattern=self.uri_prefix))
        if self.caption is not None:
            keep &= _bools(pc.match_substring(rows["caption"], pattern=self.caption, ignore_case=True))
        if self.min_width is not None:
            keep &= _bools(pc.greater_equal(rows["width"], self.min_width))
        if self.min_height is not None:
            keep &= _bools(pc.greater_equal(rows["height"], self.min_height))
        if self.meta:
            docs = [_json(m) for m in rows["meta"].to_pylist()]
            for name, value in self.meta.items():
                accepted = value if isinstance(value, list) else [value]
                keep &= np.array([d.get(name, _MISSING) in accepted for d in docs], bool)
        return keep


def matching(db: tables.Database, where: Filter) -> list[str]:
    """Ids of the indexed images `where` holds for."""
    from bicascade.storage import tables  # here: the rest of this module is pure pyarrow (fast mutation tests)

    rows = db.dataset(tables.IMAGES).to_table(columns=list(Filter.COLUMNS))
    return np.asarray(rows.column("id").to_pylist(), dtype=object)[where.mask(rows)].tolist()


_MISSING = object()


def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_TEXT)


def _bools(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), bool)


def _json(text: str | None) -> dict:
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
