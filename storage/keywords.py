"""Keyword search over the images: a LanceDB full-text index (BM25, stemmed, stop words out) on one `keywords`
column per image, made of its caption, the words of its path (folders and file name), its camera and lens and its
source metadata. Built by each index run for the rows that have no keywords yet (older databases included); rows
added after the index was built are searched too (unindexed rows are scanned), and removed rows never come back."""
from __future__ import annotations

import logging

from lancedb.index import FTS

from bicascade.errors import NotIndexedError
from bicascade.storage import tables

log = logging.getLogger("bicascade")
# the words of an image, as SQL over its own row (nulls are skipped by concat_ws)
WORDS = ("concat_ws(' ', caption, regexp_replace(uri, '[^[:alnum:]]+', ' ', 'g'), camera_make, camera_model, lens, "
         """regexp_replace(meta, '"[^"]*"[[:space:]]*:', ' ', 'g'))""")  # the metadata's values, not its keys
SCAN_FACTOR = 20  # a filtered keyword search asks the index for this many times the results it needs


def build(db: tables.Database) -> None:
    """Fill `keywords` where it is missing and (re)build the full-text index over it."""
    if not db.has(tables.IMAGES):
        return
    table = db.table(tables.IMAGES, tables.IMAGES_SCHEMA)
    tables.retrying(lambda: table.update(where="keywords IS NULL", values_sql={"keywords": WORDS}))
    if table.count_rows():
        tables.retrying(lambda: table.create_index("keywords", config=FTS(), replace=True))


def current(db: tables.Database) -> bool:
    """Every image has its keywords and the index exists (a run killed before `build` leaves rows without them)."""
    return indexed(db) and not db.table(tables.IMAGES).count_rows("keywords IS NULL")


def indexed(db: tables.Database) -> bool:
    return db.has(tables.IMAGES) and any(
        i.index_type == "FTS" and i.columns == ["keywords"] for i in db.table(tables.IMAGES).list_indices())


def search(db: tables.Database, text: str, n: int, allowed: set[str] | None = None) -> list[tuple[str, float]]:
    """The best `n` (id, BM25 score) for `text` among the `allowed` images (a filter's matches; None: all), best
    first."""
    if not indexed(db):
        raise NotIndexedError(f"{db.uri} has no keyword index yet: run `bicascade index SOURCE --db {db.uri}` once "
                              "(with a source already indexed it adds nothing and builds the index)")
    limit = n if allowed is None else n * SCAN_FACTOR
    rows = (db.table(tables.IMAGES).search(text, query_type="fts", fts_columns="keywords")
            .select(["id", "_score"]).limit(limit).to_arrow().to_pylist())
    return [(r["id"], float(r["_score"])) for r in rows if allowed is None or r["id"] in allowed][:n]
