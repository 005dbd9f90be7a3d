"""What a filter costs before level 0 ranks, on an `images` table of a photo library's shape (capture time, camera,
place, file type, folders; no pixels: they are not read): the whole filter computed over its columns read in full
(no pushdown), the indexable conditions pushed down to LanceDB without scalar indexes, and with them
(`filters.build_indexes`). Prints p50 per filter and the ratios, measured in one run. Not a test.

    python bench/filters.py [--rows 1000000] [--repeats 7] [--out bench/results/filters_1m_cpu.json]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa
from common import emit

from bicascade.storage import filters, tables
from bicascade.storage.filters import Filter

WHERES = {  # from selective to broad
    "a week": {"taken_after": "2023-07-01", "taken_before": "2023-07-08"},
    "one folder": {"uri_prefix": "/photos/2021/17/"},
    "a year's folders": {"uri_prefix": "/photos/2021/"},
    "near Paris, 5 km": {"near": {"lat": 48.8566, "lon": 2.3522, "km": 5}},
    "HEIC of a year": {"media_type": "heic", "taken_after": "2022-01-01", "taken_before": "2023-01-01"},
    "large, by one camera": {"min_width": 4000, "camera": "pixel"},
}


def library(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    start = np.datetime64("2018-01-01T00:00:00", "us")
    taken = start + (rng.random(rows) * 7 * 365 * 86400e6).astype("timedelta64[us]")
    years = taken.astype("datetime64[Y]").astype(int) + 1970
    folders = rng.integers(0, 50, rows)
    cities = np.array([[48.8566, 2.3522], [51.5072, -0.1276], [40.7128, -74.006], [35.6762, 139.6503]])
    where = cities[rng.integers(0, len(cities), rows)] + rng.normal(0, 0.3, (rows, 2))  # trips around four cities
    has_gps = rng.random(rows) < 0.7
    cameras = np.array([("Apple", "iPhone 15 Pro"), ("Google", "Pixel 8"), ("Canon", "EOS R5"), ("FUJIFILM", "X100V")])
    camera = cameras[rng.integers(0, len(cameras), rows)]
    return pa.table({
        "id": [f"{i:016x}" for i in range(rows)],
        "uri": [f"/photos/{y}/{f}/IMG_{i:07d}.jpg" for i, (y, f) in enumerate(zip(years, folders))],
        "width": rng.choice([3024, 4032, 6000, 1920], rows).astype(np.int32),
        "height": rng.choice([4032, 3024, 4000, 1080], rows).astype(np.int32),
        "media_type": rng.choice(["image/jpeg", "image/heic", "image/png"], rows, p=[0.6, 0.35, 0.05]),
        "taken": pa.array(taken, pa.timestamp("us")),
        "camera_make": camera[:, 0], "camera_model": camera[:, 1],
        "lat": pa.array(np.where(has_gps, where[:, 0], np.nan), mask=~has_gps),
        "lon": pa.array(np.where(has_gps, where[:, 1], np.nan), mask=~has_gps),
    })


def no_pushdown(db: tables.Database, where: Filter) -> list[str]:
    """The filter as it ran before pushdown: its columns read whole, then computed in memory."""
    dataset = db.dataset(tables.IMAGES)
    rows = dataset.to_table(columns=[c for c in Filter.COLUMNS if c in dataset.schema.names])
    for name in Filter.COLUMNS:
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, tables.IMAGES_SCHEMA.field(name).type))
    return np.asarray(rows["id"].to_pylist(), dtype=object)[where.mask(rows)].tolist()


def p50(fn, repeats: int) -> tuple[float, list[str]]:
    times, out = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times)), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = tables.Database(tmp)
        t0 = time.perf_counter()
        db.table(tables.IMAGES, tables.IMAGES_SCHEMA).add(library(a.rows))
        written = time.perf_counter() - t0
        parsed = {name: Filter.parse(w) for name, w in WHERES.items()}
        rows = {name: {} for name in WHERES}
        for name, f in parsed.items():
            rows[name]["no_pushdown_ms"], want = p50(lambda f=f: no_pushdown(db, f), a.repeats)
            rows[name]["pushdown_ms"], got = p50(lambda f=f: filters.matching(db, f), a.repeats)
            assert sorted(got) == sorted(want), name
            rows[name]["matches"] = len(want)
        t0 = time.perf_counter()
        filters.build_indexes(db, min_rows=1)
        built = time.perf_counter() - t0
        for name, f in parsed.items():
            rows[name]["indexed_ms"], got = p50(lambda f=f: filters.matching(db, f), a.repeats)
            assert sorted(got) == sorted(no_pushdown(db, f)), name
            r = rows[name]
            r |= {k: round(v, 2) for k, v in r.items() if k.endswith("_ms")}
            r["speedup_indexed_vs_no_pushdown"] = round(r["no_pushdown_ms"] / r["indexed_ms"], 2)
        print(f"{'filter':<24} {'matches':>8} {'no pushdown':>12} {'pushdown':>9} {'indexed':>8} {'speed-up':>8}")
        for name, r in rows.items():
            print(f"{name:<24} {r['matches']:>8} {r['no_pushdown_ms']:>10.1f}ms {r['pushdown_ms']:>7.1f}ms "
                  f"{r['indexed_ms']:>6.1f}ms {r['speedup_indexed_vs_no_pushdown']:>7.2f}x")
        emit({"rows": a.rows, "repeats": a.repeats, "write_s": round(written, 1), "index_build_s": round(built, 1),
              "filters": WHERES, "p50": rows}, a.out)


if __name__ == "__main__":
    main()
