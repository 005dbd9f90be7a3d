"""`bicascade index FOLDER --sync`: make the database what the folder is now. Files gone from the folder leave the
ledger, and their images every table (unless the same bytes are still indexed from another path: that image stays,
under its remaining path); a file whose modification time changed is re-read as a new file (same path, new bytes:
a new image). Run before the index job, which then adds what is new; a sync interrupted between the two is
finished by the next one (what it removed is simply new again)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from bicascade.errors import BadInputError
from bicascade.pipelines.ingest.sources import Source
from bicascade.storage import tables

log = logging.getLogger("bicascade")


@dataclass(frozen=True)
class SyncPlan:
    gone: list[str]  # indexed uris no longer in the folder
    changed: list[str]  # indexed uris whose file has another modification time


def plan(db: tables.Database, src: Source) -> SyncPlan:
    """What differs between the folder's listing and the ledger's rows under it."""
    if src.kind != "files":
        raise BadInputError(f"--sync keeps a folder of image files in step; {src.uri} is {src.kind} (re-index a "
                            "changed shard into a new database, or remove its images with `bicascade remove`)")
    if not db.has(tables.SOURCES):
        return SyncPlan([], [])
    db.table(tables.SOURCES, tables.SOURCES_SCHEMA)  # a ledger from before modification times: gains the column
    listed = {src.scheme + path: src.modified.get(path) for path in src.units}
    root = src.scheme + src.root
    ledger = db.dataset(tables.SOURCES).to_table(columns=["uri", "modified"]).to_pylist()
    gone, changed = [], []
    for row in ledger:
        uri = row["uri"]
        if uri == root or uri.startswith(root.rstrip("/") + "/"):
            if uri not in listed:
                gone.append(uri)
            elif row["modified"] is not None and listed[uri] is not None and \
                    abs(row["modified"].timestamp() - listed[uri]) > 1e-3:
                changed.append(uri)
    return SyncPlan(sorted(set(gone)), sorted(set(changed)))


def apply(db: tables.Database, todo: SyncPlan) -> int:
    """Take the plan's uris out of the ledger (and the error log), then remove the images no remaining uri holds.
    Returns how many images were removed."""
    dropped = todo.gone + todo.changed
    if not dropped:
        return 0
    ledger = db.dataset(tables.SOURCES).to_table(columns=["uri", "id"]).to_pylist()
    out = set(dropped)
    touched = {r["id"] for r in ledger if r["uri"] in out}
    remaining: dict[str, str] = {}
    for r in ledger:
        if r["id"] in touched and r["uri"] not in out:
            remaining.setdefault(r["id"], r["uri"])
    db.forget_uris(dropped)
    orphans = sorted(touched - set(remaining))
    db.remove_images(orphans)
    moved = db.take(tables.IMAGES, sorted(remaining), ["id", "uri"]).to_pylist()
    db.relocate({r["id"]: remaining[r["id"]] for r in moved if r["uri"] in out})  # same bytes, another path
    log.info("sync: %d files gone, %d changed; %d images removed", len(todo.gone), len(todo.changed), len(orphans))
    return len(orphans)

