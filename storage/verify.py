"""`bicascade verify`: the invariants of a database, checked table by table, and the repairs that restore them.

Invariants: one row per id in every table; embeddings finite and of unit norm; every embedded or cached id present
in `images`; every image embedded by level 0; the ANN index (when there is one) covering its table; the resume
ledger naming only stored images. Repairs keep one row per id, drop orphans and broken vectors (a cache recomputes
them on demand; level-0 rows missing afterwards are re-embedded by the next `bicascade index`), and fold unindexed
rows into the ANN index.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from lancedb.expr import col

from bicascade.storage import tables

NORM_TOLERANCE = 1e-3


@dataclass
class TableReport:
    name: str
    rows: int
    duplicate_ids: int = 0  # ids stored more than once
    bad_vectors: int = 0  # not finite, or not of unit norm
    orphans: int = 0  # ids not in `images`
    missing: int = 0  # level 0: images without a vector
    unindexed: int = 0  # rows the ANN index does not cover
    repaired: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        for what, n in (("duplicate ids", self.duplicate_ids), ("broken vectors", self.bad_vectors),
                        ("ids not in images", self.orphans), ("images without a level-0 vector", self.missing),
                        ("rows outside the ANN index", self.unindexed)):
            if n:
                out.append(f"{self.name}: {n} {what}")
        return out


@dataclass
class VerifyReport:
    db: str
    tables: list[TableReport]
    ladder: list[str]  # problems with the recorded ladder (fingerprints that no longer match)

    @property
    def problems(self) -> list[str]:
        return [p for t in self.tables for p in t.problems] + self.ladder

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"db": self.db, "ok": self.ok, "problems": self.problems,
                "tables": [asdict(t) | {"problems": t.problems} for t in self.tables]}

    def format(self) -> str:
        lines = [f"{self.db}: {'ok' if self.ok else f'{len(self.problems)} problem(s)'}"]
        for t in self.tables:
            state = "; ".join(t.problems) if t.problems else "ok"
            lines.append(f"  {t.name:<28} {t.rows:>9} rows  {state}" + (f"  [repaired: {', '.join(t.repaired)}]"
                                                                        if t.repaired else ""))
        return "\n".join(lines + [f"  ladder: {p}" for p in self.ladder])


def _duplicates(ids: Sequence[str]) -> list[str]:
    return [i for i, n in Counter(ids).items() if n > 1]


def _delete_ids(table, ids: Sequence[str]) -> None:
    for start in range(0, len(ids), 1000):
        table.delete(col("id").isin(list(ids[start:start + 1000])))


def _valid(row: dict) -> bool:
    v = np.asarray(row.get("vector") if row.get("vector") is not None else [1.0], np.float64)
    return bool(np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) <= NORM_TOLERANCE)


def _keep_one(db: tables.Database, name: str, ids: Sequence[str]) -> None:
    """Rows of `ids` replaced by one copy each: a valid one where there is one."""
    rows = db.take(name, ids, db.table(name).schema.names)
    first: dict[str, dict] = {}
    for r in rows.to_pylist():
        if r["id"] not in first or (not _valid(first[r["id"]]) and _valid(r)):
            first[r["id"]] = r
    table = db.table(name)
    _delete_ids(table, list(first))
    table.add(pa.Table.from_pylist(list(first.values()), schema=table.schema))


def _scan(db: tables.Database, name: str, image_ids: set[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(ids, duplicated ids, ids with a broken vector, ids not in images) of an embedding table."""
    data = db.dataset(name).to_table(columns=["id", "vector"])
    ids = data.column("id").to_pylist()
    vectors = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1) \
        if ids else np.zeros((0, 1), np.float32)
    norms = np.linalg.norm(vectors, axis=1) if len(ids) else np.zeros(0)
    bad = [i for i, ok in zip(ids, np.isfinite(vectors).all(1) & (np.abs(norms - 1) <= NORM_TOLERANCE)) if not ok]
    return ids, _duplicates(ids), bad, sorted(set(ids) - image_ids)


def check_embeddings(db: tables.Database, name: str, image_ids: set[str], level0: bool,
                     repair: bool) -> TableReport:
    ids, dups, bad, orphans = _scan(db, name, image_ids)
    report = TableReport(name, len(ids))
    report.duplicate_ids, report.bad_vectors, report.orphans = len(dups), len(set(bad)), len(orphans)
    if level0:
        report.missing = len(image_ids - set(ids))
    if db.has_vector_index(name):
        stats = db.table(name).index_stats(next(ix.name for ix in db.table(name).list_indices()
                                                if "vector" in ix.columns))
        report.unindexed = int(getattr(stats, "num_unindexed_rows", 0) or 0)
    if repair:
        table = db.table(name)
        if dups:
            _keep_one(db, name, dups)
            report.repaired.append(f"kept one row of {len(dups)} duplicated ids")
            _, _, bad, orphans = _scan(db, name, image_ids)
        drop = sorted(set(bad) | set(orphans))
        if drop:
            _delete_ids(table, drop)
            report.repaired.append(f"dropped {len(drop)} broken or orphaned rows"
                                   + (" (re-run `bicascade index` to re-embed them)" if level0 and bad else ""))
        if report.unindexed:
            db.compact(name)
            report.repaired.append("folded unindexed rows into the ANN index")
    return report


def check_images(db: tables.Database, repair: bool) -> tuple[TableReport, set[str]]:
    ids = db.column(tables.IMAGES, "id")
    report = TableReport(tables.IMAGES, len(ids))
    dups = _duplicates(ids)
    report.duplicate_ids = len(dups)
    if repair and dups:
        _keep_one(db, tables.IMAGES, dups)
        report.repaired.append(f"kept one row of {len(dups)} duplicated ids")
    return report, set(ids)


def check_ledger(db: tables.Database, image_ids: set[str], repair: bool) -> TableReport:
    if not db.has(tables.SOURCES):
        return TableReport(tables.SOURCES, 0)
    ledger = db.dataset(tables.SOURCES).to_table(columns=["uri", "id"])
    ids = ledger.column("id").to_pylist()
    report = TableReport(tables.SOURCES, len(ids))
    report.orphans = sum(i not in image_ids for i in ids)
    if repair and report.orphans:
        db.table(tables.SOURCES).delete(~col("id").isin(sorted(image_ids)) if image_ids else "true")
        report.repaired.append(f"dropped {report.orphans} ledger rows of images that are not stored (re-indexed "
                               "by the next `bicascade index`)")
    return report


def verify(db: tables.Database, fingerprints: Sequence[str], ladder_problems: Sequence[str] = (),
           repair: bool = False) -> VerifyReport:
    """Check (and with `repair`, fix) every table; `fingerprints` are the recorded ladder's, level 0 first."""
    images, image_ids = check_images(db, repair)
    reports = [images]
    names = [tables.emb_table(f) for f in fingerprints]
    others = sorted(n for n in db.names() if n.startswith("emb_") and n not in names)
    for j, name in enumerate(names + others):
        if db.has(name):
            reports.append(check_embeddings(db, name, image_ids, level0=j == 0, repair=repair))
        elif j == 0:
            reports.append(TableReport(name, 0, missing=len(image_ids)))
    reports.append(check_ledger(db, image_ids, repair))
    return VerifyReport(db.uri, reports, list(ladder_problems))
