"""`bicascade migrate`: move a database to another ladder without re-embedding the corpus with every new model.

A new upper level gets its own cache table (its fingerprint): filled lazily by queries, or with `--warm` eagerly
for exactly the images the level it replaces had cached (a Ray job). A new level 0 is a new corpus table, built
while the old one keeps serving. The ladder is recorded last, so a running `bicascade serve` that follows the
database switches to it only once everything it needs is there; old tables stay until `bicascade cache drop`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from bicascade import images, models, query
from bicascade.errors import BadInputError, NotIndexedError
from bicascade.levels import LevelInfo
from bicascade.pipelines import runtime
from bicascade.pipelines.ingest.index import EmbedBatches
from bicascade.storage import cache, tables

log = logging.getLogger("bicascade")
_DBS: dict[str, tables.Database] = {}


@dataclass
class LevelMove:
    level: int
    model: str
    fingerprint: str
    previous: str | None  # the model this level replaces (None: a new level)
    action: str  # "kept" | "lazy" | "warmed" | "rebuilt"
    embedded: int = 0  # images this migration embedded for the level


@dataclass
class MigrateReport:
    db: str
    ladder: str
    previous: str
    corpus: int
    levels: list[LevelMove] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def embedded(self) -> int:
        return sum(lv.embedded for lv in self.levels)

    def to_json(self) -> dict:
        return asdict(self) | {"embedded": self.embedded, "embedded_fraction": self.embedded / self.corpus
                               if self.corpus else 0.0}

    def format(self) -> str:
        lines = [f"{self.db}: {self.previous} -> {self.ladder} in {self.seconds} s; embedded {self.embedded} images "
                 f"for {self.corpus} in the corpus ({100 * self.embedded / max(1, self.corpus):.1f}%)"]
        lines += [f"  level {lv.level}: {lv.model} ({lv.action}" + (f", {lv.embedded} embedded" if lv.embedded else "")
                  + (f", replaces {lv.previous})" if lv.previous and lv.previous != lv.model else ")")
                  for lv in self.levels]
        return "\n".join(lines)


def decode_stored(batch: dict[str, np.ndarray], db_uri: str, preprocess_cfg: dict) -> dict[str, np.ndarray]:
    """Images of the database by id -> crops for the encoder; one that no longer decodes is skipped, not fatal."""
    db = _DBS.setdefault(db_uri, tables.Database(db_uri))
    prep = images.Preprocessor(preprocess_cfg)
    ids = [str(i) for i in batch["id"]]
    blobs = db.image_bytes(ids)
    pixels, status = [], []
    for i in ids:
        try:
            pixels.append(prep.crop(images.decode(blobs[i]).rgb))
            status.append("new")
        except Exception:  # a stored image that no longer decodes: recorded as skipped
            pixels.append(prep.blank())
            status.append("error")
    return {"id": np.array(ids, dtype=object), "status": np.array(status, dtype=object), "pixels": np.stack(pixels)}


def reembed(db: tables.Database, spec: models.ModelSpec, ids: list[str], write, batch_size: int = 64) -> int:
    """Embed stored images `ids` with `spec` in a Ray Data job; `write(ids, vectors)` is the single writer."""
    import ray
    import ray.data

    if not ids:
        return 0
    pp_cfg, _ = models.preprocessing(spec)
    runtime.connect()
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus = ray.cluster_resources().get("CPU", 1)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or max(1, int(cpus // 4))
    ds = ray.data.from_items([{"id": i} for i in ids], override_num_blocks=max(1, len(ids) // (4 * batch_size)))
    # small CPU reservations: a migration usually runs beside the server of the same database on the same cluster,
    # whose replicas hold a quarter CPU each (on 2 CPUs a whole-CPU encoder waited for them forever)
    ds = ds.map_batches(decode_stored, batch_size=batch_size, num_cpus=0.25,
                        fn_kwargs={"db_uri": db.uri, "preprocess_cfg": pp_cfg})
    ds = ds.map_batches(EmbedBatches, fn_constructor_kwargs={"spec": spec, "threads": max(1, int(cpus) // actors)},
                        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size,
                        num_gpus=1 if gpus else 0, num_cpus=0.5)
    done = 0
    with tqdm(total=len(ids), desc=f"embed {spec.name}", unit="img", mininterval=1) as bar:
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            ok = batch["status"] == "new"
            write([str(i) for i in batch["id"][ok]], batch["vector"][ok])
            done += int(ok.sum())
            bar.update(len(batch["id"]))
    return done


def migrate(db_uri: str, ladder: str, warm: bool = False) -> MigrateReport:
    t0 = time.perf_counter()
    db = tables.Database(db_uri)
    rows = db.recorded_ladder()
    if not rows:
        raise NotIndexedError(f"{db_uri} has not been indexed: `bicascade index SOURCE --db {db_uri} --ladder "
                              f"{ladder}` makes it with that ladder directly")
    new = query.registered(ladder)
    for info in new.levels:
        models.preflight(info.spec)
    old = [(r["fingerprint"], json.loads(r["model"])["name"]) for r in rows]
    corpus = db.column(tables.IMAGES, "id")
    report = MigrateReport(db_uri, new.name, rows[0]["ladder"], len(corpus))
    for j, info in enumerate(new.levels):
        previous = old[j] if j < len(old) else None
        move = LevelMove(j, info.name, info.fingerprint, previous[1] if previous else None, "kept")
        table = tables.emb_table(info.fingerprint)
        if previous and previous[0] == info.fingerprint:
            report.levels.append(move)
            continue
        if j == 0:  # a new corpus table, built beside the one that serves
            have = db.ids(table)
            todo = [i for i in corpus if i not in have]
            writer = Level0Writer(db, info)
            move.embedded = reembed(db, info.spec, todo, writer.add)
            writer.flush()
            db.finish([table])
            db.build_ann(info.fingerprint)
            move.action = "rebuilt"
        elif warm and previous is not None and db.has(tables.emb_table(previous[0])):
            store = cache.LevelCache(db, info.fingerprint, info.dim, flush_rows=1024, flush_s=3600)
            have = db.ids(table)
            todo = [i for i in db.ids(tables.emb_table(previous[0])) if i not in have]
            move.embedded = reembed(db, info.spec, todo, store.put)
            store.flush()
            move.action = "warmed"
        else:
            move.action = "lazy"
        report.levels.append(move)
    query.record(db, new, replace_level0=True)
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


class Level0Writer:
    """The new corpus table's single writer, in bounded batches."""

    def __init__(self, db: tables.Database, info: LevelInfo, flush_rows: int = 1024) -> None:
        self.db, self.name, self.schema = db, tables.emb_table(info.fingerprint), tables.emb_schema(info.dim)
        self.dim, self.flush_rows = info.dim, flush_rows
        self.ids: list[str] = []
        self.vectors: list[np.ndarray] = []

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        self.ids += ids
        self.vectors += list(vectors)
        if len(self.ids) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            vec = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(self.vectors).ravel(), pa.float32()), self.dim)
            self.db.insert_new(self.name, self.schema, pa.Table.from_arrays([pa.array(self.ids, pa.string()), vec],
                                                                            schema=self.schema))
        self.ids, self.vectors = [], []


def drop(db_uri: str, fingerprints: list[str] | None = None) -> list[str]:
    """Drop embedding tables the recorded ladder does not use (or the named ones, if unused): old caches after a
    migration. The recorded ladder's own tables are never dropped."""
    db = tables.Database(db_uri)
    used = {tables.emb_table(r["fingerprint"]) for r in db.recorded_ladder()}
    names = [n for n in db.names() if n.startswith("emb_")]
    wanted = names if not fingerprints else [tables.emb_table(f) for f in fingerprints]
    busy = [n for n in wanted if n in used]
    if fingerprints and busy:
        raise BadInputError(f"{', '.join(busy)} belong to the recorded ladder; migrate away from it first")
    missing = [n for n in wanted if n not in names]
    if missing:
        raise BadInputError(f"no tables {', '.join(missing)} in {db_uri}")
    gone = [n for n in wanted if n not in used]
    for name in gone:
        db.drop(name)
    return gone

