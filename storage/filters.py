"""Filters on the `images` table for filtered search: a small, validated vocabulary (uri prefix, caption text, size,
metadata fields, capture time, camera, place, file type) evaluated with pyarrow compute over the table's columns.
The conditions a column index can answer are pushed down to LanceDB as a pyarrow expression (scalar indexes on
those columns once the table is large: `build_indexes`), and the whole filter is then checked on the rows read.
User input is only ever a value compared with a column, never text spliced into a query string."""
from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bicascade.errors import BadInputError

if TYPE_CHECKING:
    from bicascade.storage import tables

MAX_TEXT = 500  # longest prefix / substring / metadata value a filter takes
MAX_FIELDS = 16
EARTH_KM = 6371.0088
# the columns whose conditions are pushed down to LanceDB (3-7x faster than reading them whole at 1-10M rows), and
# the one with a scalar index on a large table: a folder, the only condition a BTREE answered faster than LanceDB's
# own scan (2x at 10M; a week's range no faster, a year's or a place's band of latitude 1.5-2x slower: bench/filters.py)
PUSHED = ("uri", "width", "height", "taken", "lat", "media_type")
INDEXED = ("uri",)
INDEX_MIN_ROWS = 100_000  # below this a read of the filter's columns beats index lookups
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Filter:
    """All conditions must hold. `meta` compares fields of the JSON metadata a source carried (parquet columns,
    webdataset .json) for equality; a field may be given a list of accepted values. The capture conditions read the
    columns the index job filled from each file's EXIF (bicascade.exif): an image that does not say, matches none."""

    uri_prefix: str | None = None  # a folder (or any prefix of the uri indexed)
    caption: str | None = None  # case-insensitive substring of the caption
    min_width: int | None = None
    min_height: int | None = None
    meta: dict[str, Scalar | list[Scalar]] = field(default_factory=dict)
    taken_after: datetime | None = None  # the camera's wall-clock time, inclusive
    taken_before: datetime | None = None  # exclusive: "2024-12-25" ends on the 24th
    camera: tuple[str, ...] = ()  # any of these, a case-insensitive part of "make model"
    near: tuple[float, float, float] | None = None  # (lat, lon, km): within km of the point, great-circle
    media_type: tuple[str, ...] = ()  # any of these ("image/heic", or "heic")

    COLUMNS = ("id", "uri", "caption", "width", "height", "meta", "taken", "camera_make", "camera_model", "lat", "lon",
               "media_type")
    FIELDS = ("uri_prefix", "caption", "min_width", "min_height", "meta", "taken_after", "taken_before", "camera",
              "near", "media_type")

    @classmethod
    def parse(cls, doc: dict[str, Any] | None) -> Filter | None:
        """A filter from a request's `where` object, checked field by field (BadInputError names the bad one)."""
        if not doc:
            return None
        if not isinstance(doc, dict):
            raise BadInputError("where: must be an object")
        unknown = set(doc) - set(cls.FIELDS)
        if unknown:
            raise BadInputError(f"where: unknown fields {sorted(unknown)} ({', '.join(cls.FIELDS)})")
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
        after, before = _when(doc, "taken_after"), _when(doc, "taken_before")  # an empty range matches nothing
        media = tuple(v.lower() if "/" in v else f"image/{v.lower()}" for v in _texts(doc, "media_type"))
        return cls(doc.get("uri_prefix"), doc.get("caption"), doc.get("min_width"), doc.get("min_height"), dict(meta),
                   after, before, _texts(doc, "camera"), _near(doc.get("near")), media)

    def key(self) -> str:
        return json.dumps([getattr(self, name) for name in self.FIELDS], sort_keys=True, default=str)

    def pushdown(self, columns: Sequence[str]) -> pc.Expression | None:
        """The conditions on `PUSHED` columns, as one expression for LanceDB that holds for every matching row (a
        superset: `near` becomes its band of latitude); None when there are none, or a column is missing."""
        conds: dict[str, list[pc.Expression]] = {name: [] for name in PUSHED}
        if self.uri_prefix is not None:
            conds["uri"].append(pc.starts_with(pc.field("uri"), self.uri_prefix))
        for name, least in (("width", self.min_width), ("height", self.min_height)):
            if least is not None:
                conds[name].append(pc.field(name) >= pa.scalar(least, pa.int32()))
        if self.taken_after is not None:
            conds["taken"].append(pc.field("taken") >= pa.scalar(self.taken_after, pa.timestamp("us")))
        if self.taken_before is not None:
            conds["taken"].append(pc.field("taken") < pa.scalar(self.taken_before, pa.timestamp("us")))
        if self.media_type:
            conds["media_type"].append(pc.field("media_type").isin(list(self.media_type)))
        if self.near is not None:  # a point within km is within km / R radians of latitude
            lat0, _, km = self.near
            band = math.degrees(km / EARTH_KM)
            conds["lat"] += [pc.field("lat") >= max(-90.0, lat0 - band), pc.field("lat") <= min(90.0, lat0 + band)]
        used = [name for name, c in conds.items() if c]
        if not used or not set(used) <= set(columns):
            return None
        return functools.reduce(operator.and_, [c for name in used for c in conds[name]])

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
        for when, compare in ((self.taken_after, pc.greater_equal), (self.taken_before, pc.less)):
            if when is not None:
                keep &= _bools(compare(rows["taken"].cast(pa.timestamp("us")), pa.scalar(when, pa.timestamp("us"))))
        if self.camera:
            camera = pc.binary_join_element_wise(pc.fill_null(rows["camera_make"], ""),
                                                 pc.fill_null(rows["camera_model"], ""), " ")
            keep &= np.any([_bools(pc.match_substring(camera, pattern=c, ignore_case=True)) for c in self.camera], 0)
        if self.media_type:
            keep &= _bools(pc.is_in(rows["media_type"], value_set=pa.array(self.media_type, pa.string())))
        if self.near is not None:
            lat0, lon0, km = self.near
            keep &= km_between(_floats(rows["lat"]), _floats(rows["lon"]), lat0, lon0) <= km
        return keep


def km_between(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    """Great-circle distances (haversine, mean Earth radius) from (lat0, lon0); NaN where a position is unknown."""
    p, p0 = np.radians(lat), np.radians(lat0)
    h = np.sin((p - p0) / 2) ** 2 + np.cos(p) * np.cos(p0) * np.sin(np.radians(lon - lon0) / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


def matching(db: tables.Database, where: Filter) -> list[str]:
    """Ids of the indexed images `where` holds for."""
    from bicascade.storage import tables  # here: the rest of this module is pure pyarrow (fast mutation tests)

    dataset = db.dataset(tables.IMAGES)
    names = dataset.schema.names
    rows = dataset.to_table(columns=[c for c in Filter.COLUMNS if c in names], filter=where.pushdown(names))
    for name in Filter.COLUMNS:  # a database indexed before the column existed: nothing to match on
        if name not in rows.column_names:
            rows = rows.append_column(tables.IMAGES_SCHEMA.field(name), pa.nulls(rows.num_rows,
                                                                                tables.IMAGES_SCHEMA.field(name).type))
    return np.asarray(rows.column("id").to_pylist(), dtype=object)[where.mask(rows)].tolist()


def build_indexes(db: tables.Database, min_rows: int = INDEX_MIN_ROWS) -> list[str]:
    """BTREE indexes on the `INDEXED` columns of a table of at least `min_rows` images (replacing older ones: rows
    added since are scanned until the next index run); the columns indexed."""
    from lancedb.index import BTree

    from bicascade.storage import tables

    if not db.has(tables.IMAGES) or db.count(tables.IMAGES) < min_rows:
        return []
    table = db.table(tables.IMAGES, tables.IMAGES_SCHEMA)
    for name in INDEXED:
        tables.retrying(lambda n=name: table.create_index(n, config=BTree(), replace=True))
    return list(INDEXED)


_MISSING = object()


def _scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_TEXT)


def _texts(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    values = value if isinstance(value, list) else [value]
    if len(values) > 100 or not all(isinstance(v, str) and 0 < len(v) <= MAX_TEXT for v in values):
        raise BadInputError(f"where.{key}: must be a string of 1 to {MAX_TEXT} characters, or a list of up to 100")
    return tuple(values)


def _when(doc: dict[str, Any], key: str) -> datetime | None:
    if key not in doc:
        return None
    try:
        when = datetime.fromisoformat(doc[key]) if isinstance(doc[key], str) and len(doc[key]) <= 40 else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is not None:
        raise BadInputError(f"where.{key}: must be a date or a date and time without offset (the camera's clock), "
                            f"e.g. 2024-12-24 or 2024-12-24T18:30, got {str(doc[key])[:60]!r}")
    return when


def _near(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    ok = isinstance(value, dict) and set(value) == {"lat", "lon", "km"} and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value.values())
    if not ok or not (-90 <= value["lat"] <= 90 and -180 <= value["lon"] <= 180 and 0 < value["km"] <= 20_040):
        raise BadInputError("where.near: must be {\"lat\": -90..90, \"lon\": -180..180, \"km\": above 0, at most "
                            "20040}")
    return float(value["lat"]), float(value["lon"]), float(value["km"])


def _floats(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr.cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False), np.float64)


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
