"""`bicascade index`: a resumable Ray Data job that embeds a corpus with the ladder's cheapest level into LanceDB.

read (driver lists the source) -> decode + crop (CPU tasks, per-image try/except) -> encode (actor pool, a GPU per
actor when present) -> the driver, the single writer, commits bounded batches to LanceDB.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from bicascade import exif, images, models, query, registry
from bicascade.errors import BadInputError, NotIndexedError
from bicascade.levels import ResolvedLadder
from bicascade.pipelines import runtime
from bicascade.pipelines.ingest import sources, sync
from bicascade.storage import filters, keywords, tables

log = logging.getLogger("bicascade")


SHIP_MAX = 100_000


@dataclass
class IndexConfig:
    batch_size: int = 64  # images per encoder call
    flush_rows: int = 4096  # rows per LanceDB commit (or 64 MiB of image bytes, whichever comes first)
    ann_min_rows: int = 100_000  # below this, exact search beats an ANN index
    filter_index_min_rows: int = filters.INDEX_MIN_ROWS  # below this, filters read their columns whole
    sync: bool = False  # a folder: also remove what left it and re-read what changed (pipelines/ingest/sync.py)


@dataclass
class IndexReport:
    """What one `bicascade index` run did (its --json document)."""

    rows: int
    new_rows: int
    errors: int
    skipped: int
    ignored: int  # files of a folder that are no image by their extension (videos, sidecars), left out with a warning
    seconds: float
    images_per_s: float
    startup_s: float | None  # to the first encoded batch: worker start-up, imports, model loads
    table_version: int
    table: str
    model: str
    ladder: str
    ann: str
    gone: int = 0  # --sync: indexed files no longer in the folder
    changed: int = 0  # --sync: indexed files with new contents (re-read; their new images count in new_rows)
    removed: int = 0  # --sync: images removed with them (not those whose bytes are also indexed at another path)

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        synced = f"; {self.gone} files gone, {self.changed} changed, {self.removed} images removed" \
            if self.gone or self.changed else ""
        return (f"{self.rows} rows in {self.table} ({self.new_rows} new, {self.errors} errors, {self.skipped} skipped) "
                f"in {self.seconds} s, {self.images_per_s} images/s{synced}")


def decode_batch(batch: dict[str, np.ndarray], preprocess_cfg: dict, known: set[str], done: set[str],
                 device_jpegs: bool = False) -> dict:
    """Read, hash, decode and crop each image on its own: a bad file never takes its block down. With
    `device_jpegs` (a GPU encodes), a JPEG the GPU decodes as the CPU would only has its header read here: its bytes
    travel in `jpeg` and the encoder decodes, crops and (for a large one) makes the stored copy on its device."""
    prep = images.Preprocessor(preprocess_cfg)
    out: dict[str, list] = {k: [] for k in ("uri", "id", "status", "stage", "error", "bytes", "width", "height",
                                            "caption", "meta", "pixels", "jpeg", "warning", *CAPTURE_TEXT,
                                            *CAPTURE_NUMBERS)}
    uris = [str(u) for u in batch["uri"]]
    fetch = [i for i, uri in enumerate(uris) if uri not in done and _opt(batch, "bytes", i) is None]
    fetched = dict(zip(fetch, sources.read_many([uris[i] for i in fetch])))  # all at once, not file after file
    for i, uri in enumerate(uris):
        row = {"uri": uri, "id": "", "status": "new", "stage": "", "error": "", "bytes": b"", "width": 0,
               "height": 0, "caption": _opt(batch, "caption", i), "meta": _opt(batch, "meta", i),
               "pixels": prep.blank(), "jpeg": b"", "warning": None, **dict.fromkeys(CAPTURE_TEXT),
               **dict.fromkeys(CAPTURE_NUMBERS, math.nan)}
        row["modified"] = _opt(batch, "modified", i) or math.nan
        stage = "read"
        try:
            if uri in done:
                row["status"] = "done"
            else:
                data = fetched[i] if i in fetched else _opt(batch, "bytes", i)
                if isinstance(data, Exception):
                    raise data
                row["id"] = images.content_id(data)
                if row["id"] in known:
                    row["status"] = "known"
                elif device_jpegs and (head := images.device_jpeg(data)):
                    row.update(jpeg=data, bytes=data if len(data) <= images.MAX_STORED_BYTES else b"",
                               width=head.width, height=head.height, file_size=len(data),
                               **capture_fields(head.capture))
                else:
                    stage = "decode"
                    decoded = images.decode(data)
                    stage = "preprocess"
                    row.update(bytes=images.stored_bytes(data, decoded), width=decoded.width, height=decoded.height,
                               pixels=prep.crop(decoded.rgb), file_size=len(data), **capture_fields(decoded.capture))
        except Exception as e:  # every failure is recorded per image, with its stage
            row.update(status="error", stage=stage, error=f"{type(e).__name__}: {e}"[:500])
        for k, v in row.items():
            out[k].append(v)
    result = {k: np.array(v, dtype=object) for k, v in out.items() if k != "pixels"}
    result["pixels"] = np.stack(out["pixels"])
    return result


CAPTURE_TEXT = ("media_type", "camera_make", "camera_model", "lens")
# numbers between the tasks and the writer: NaN where unknown (a float column in every block, never a null one)
CAPTURE_NUMBERS = ("taken", "taken_offset", "lat", "lon", "file_size", "modified")
EPOCH = datetime(1970, 1, 1)


def capture_fields(capture: exif.Capture) -> dict[str, Any]:
    """A decoded image's capture metadata as the columns decode_batch ships (the capture time in seconds since the
    epoch of its own wall clock)."""
    nan = math.nan
    return {"media_type": capture.media_type, "camera_make": capture.camera_make, "camera_model": capture.camera_model,
            "lens": capture.lens, "warning": capture.warning,
            "taken": (capture.taken - EPOCH).total_seconds() if capture.taken else nan,
            "taken_offset": nan if capture.taken_offset is None else capture.taken_offset,
            "lat": nan if capture.lat is None else capture.lat, "lon": nan if capture.lon is None else capture.lon}


def image_row(batch: dict[str, np.ndarray], i: int, id_: str, uri: str) -> dict[str, Any]:
    """The `images` row of item i of a decoded batch."""
    taken, offset, size, modified = (_opt(batch, k, i) for k in ("taken", "taken_offset", "file_size", "modified"))
    return {"id": id_, "uri": uri, "bytes": bytes(batch["bytes"][i]), "width": int(batch["width"][i]),
            "height": int(batch["height"][i]), "caption": _opt(batch, "caption", i), "meta": _opt(batch, "meta", i),
            **{k: _opt(batch, k, i) for k in (*CAPTURE_TEXT, "lat", "lon")},
            "taken": None if taken is None else EPOCH + timedelta(seconds=float(taken)),
            "taken_offset": None if offset is None else int(offset),
            "file_size": None if size is None else int(size),
            "modified": utc(modified)}


def utc(seconds: float | None) -> datetime | None:
    """A listing's modification time (seconds since the epoch) as the tables store it."""
    return None if seconds is None else datetime.fromtimestamp(float(seconds), timezone.utc)


def _opt(batch: dict, key: str, i: int) -> Any:
    if key not in batch:
        return None
    value = batch[key][i]
    return None if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)) else value


DEVICE_DECODE = 32  # JPEGs decoded per call on a GPU: a batch of 12 MP photos is 36 MB each there


class EmbedBatches:
    """Ray Data callable class: loads level 0 once per actor, encodes the new images of each batch; the JPEGs
    decode_batch left whole (`jpeg`) are decoded, cropped and stored-copied on the model's device first, and any the
    device refuses on the CPU, as every other image was."""

    def __init__(self, spec: models.ModelSpec, threads: int | None) -> None:
        models.set_threads(threads)
        self.model = models.load_model(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = batch.pop("pixels")
        on_device = self._device_crops(batch, batch.pop("jpeg", None), pixels)
        new = np.flatnonzero(batch["status"] == "new")
        vectors = np.zeros((len(pixels), self.model.dim), np.float32)
        if len(new):
            dev = self.model.device
            crops = torch.stack([on_device[i] if i in on_device else torch.from_numpy(pixels[i]).to(dev) for i in new])
            vectors[new] = self.model.encode_pixels(self.model.preprocess.normalize(crops, dev))
        batch["vector"] = vectors
        return batch

    def _device_crops(self, batch: dict[str, np.ndarray], jpegs: np.ndarray | None, pixels: np.ndarray) -> dict:
        """Row -> crop on the device, for the rows whose JPEG the device decoded; the others' pixels, stored copy or
        error are filled in place."""
        rows = [] if jpegs is None else [i for i in range(len(jpegs)) if len(jpegs[i]) and batch["status"][i] == "new"]
        if rows:  # Ray Data's arrays may be read-only, or fixed-width strings: writable objects
            batch.update({k: np.array(batch[k], dtype=object) for k in ("status", "stage", "error", "bytes")})
        crops = {}
        prep = self.model.preprocess
        for start in range(0, len(rows), DEVICE_DECODE):
            chunk = rows[start:start + DEVICE_DECODE]
            for i, rgb in zip(chunk, images.decode_jpegs([bytes(jpegs[i]) for i in chunk], self.model.device)):
                data = bytes(jpegs[i])
                try:
                    if rgb is None:  # the device refused it: the CPU's decoder, which says what is wrong
                        decoded = images.decode(data)
                        pixels[i], batch["bytes"][i] = prep.crop(decoded.rgb), images.stored_bytes(data, decoded)
                    else:
                        crops[i] = prep.crop_tensor(rgb)
                        if not len(batch["bytes"][i]):
                            batch["bytes"][i] = images.stored_jpeg(rgb, data)
                except Exception as e:
                    batch["status"][i], batch["stage"][i] = "error", "decode"
                    batch["error"][i] = f"{type(e).__name__}: {e}"[:500]
        return crops


class DecodeEmbedBatches(EmbedBatches):
    """CPU-only clusters: each actor reads, decodes, crops and encodes its own batches, one stage on every core, so
    no crop crosses the object store and no core waits for another stage."""

    def __init__(self, spec: models.ModelSpec, threads: int | None, decode: dict) -> None:
        super().__init__(spec, threads)
        self.decode = decode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(decode_batch(batch, **self.decode))


class Writer:
    """The job's single writer: bounded batched appends (plain appends, so a commit costs the same at any table
    size), a row never written twice (ids already stored are known up front), the ledger written last: after a
    crash, an image whose vector was not committed is embedded again and its `images` row is not repeated."""

    def __init__(self, db: tables.Database, fingerprint: str, dim: int, embedded: set[str], stored: set[str],
                 run: str, flush_rows: int, flush_bytes: int = 64 << 20):
        self.db, self.emb, self.schema = db, tables.emb_table(fingerprint), tables.emb_schema(dim)
        self.embedded, self.stored, self.run = embedded, stored, run
        self.flush_rows, self.flush_bytes = flush_rows, flush_bytes
        self.images: list[dict] = []
        self.ids: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.ledger: list[dict] = []
        self.errors: list[dict] = []
        self.bytes = 0
        self.new_rows = self.skipped = self.error_count = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for i, status in enumerate(batch["status"]):
            uri, id_ = str(batch["uri"][i]), str(batch["id"][i])
            if status == "done":
                self.skipped += 1
            elif status == "error":
                self.errors.append({"uri": uri, "stage": str(batch["stage"][i]), "error": str(batch["error"][i]),
                                    "run": self.run})
                self.error_count += 1
            else:
                if status == "new" and id_ not in self.embedded:
                    self.embedded.add(id_)
                    self.ids.append(id_)
                    self.vectors.append(batch["vector"][i])
                    if id_ not in self.stored:
                        self.stored.add(id_)
                        row = image_row(batch, i, id_, uri)
                        self.bytes += len(row["bytes"])
                        self.images.append(row)
                        if _opt(batch, "warning", i):  # indexed all the same; the warning is kept with the errors
                            self.errors.append({"uri": uri, "stage": tables.WARNING_STAGE,
                                                "error": str(batch["warning"][i]), "run": self.run})
                    self.new_rows += 1
                else:  # the same bytes again: one row, this uri only joins the ledger
                    self.skipped += 1
                self.ledger.append({"uri": uri, "id": id_, "modified": utc(_opt(batch, "modified", i))})
        if len(self.ledger) + len(self.errors) >= self.flush_rows or self.bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """images, then vectors, then the ledger: each commit only ever adds what the one before made safe."""
        if self.images:
            self.db.table(tables.IMAGES, tables.IMAGES_SCHEMA).add(pa.Table.from_pylist(self.images,
                                                                                       tables.IMAGES_SCHEMA))
        if self.ids:
            vec = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(self.vectors).ravel(), pa.float32()),
                                                    self.schema.field("vector").type.list_size)
            self.db.table(self.emb, self.schema).add(pa.Table.from_arrays([pa.array(self.ids, pa.string()), vec],
                                                                          schema=self.schema))
        self.db.append(tables.ERRORS, tables.ERRORS_SCHEMA, self.errors)
        self.db.append(tables.SOURCES, tables.SOURCES_SCHEMA, self.ledger)
        self.images, self.ids, self.vectors, self.ledger, self.errors, self.bytes = [], [], [], [], [], 0


def resolve_ladder(db: tables.Database, ladder: str | None) -> ResolvedLadder:
    """The ladder to index with: `ladder`, else the one the database remembers; a fresh database needs a name."""
    try:
        return query.open_ladder(db, ladder)
    except NotIndexedError:
        known = ", ".join(sorted(ladder.name for ladder in registry.list_ladders()))
        raise BadInputError(f"{db.uri} is a new database: say which ladder embeds it with --ladder NAME (known: "
                            f"{known}; `bicascade ladders` lists them, `bicascade ladders add NAME "
                            "ARCH=CHECKPOINT ...` makes one from your own CLIP checkpoints)") from None


def run_index(source: str, db_uri: str, ladder: str | None = None, config: IndexConfig = IndexConfig()) -> IndexReport:
    """Index `source` into `db_uri` with level 0 of the ladder; rerunning adds only what is missing."""
    import ray
    import ray.data

    t0 = time.perf_counter()
    src = sources.list_source(source)
    if not src.units:
        raise BadInputError(f"source has no images ({', '.join(sources.IMAGE_EXTS)}), parquet or .tar files: {source}")
    db = tables.Database(db_uri)
    resolved = resolve_ladder(db, ladder)
    level0 = resolved.levels[0]
    spec = level0.spec
    models.preflight(spec)
    pp_cfg, dim = models.preprocessing(spec)
    emb = tables.emb_table(level0.fingerprint)
    query.record(db, resolved)
    synced = sync.plan(db, src) if config.sync else sync.SyncPlan([], [])
    removed = sync.apply(db, synced)
    known = db.ids(emb)
    stored = db.ids(tables.IMAGES)
    done = db.done_uris(known)
    run = uuid.uuid4().hex[:12]
    log.info("indexing %s (%s, %d units) into %s with %s [%s]", source, src.kind, len(src.units), db_uri, spec.name,
             emb)
    if src.ignored:  # a folder's videos, raw files, sidecars: said once, not silently dropped
        log.warning("ignoring %d files that are not images by their extension (%s); images are %s",
                    sum(src.ignored.values()), ", ".join(f"{ext} x{n}" for ext, n in list(src.ignored.items())[:8]),
                    " ".join(sources.IMAGE_EXTS))

    runtime.connect()
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours below says images/s and ETA
    cpus = ray.cluster_resources().get("CPU", 1)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if src.kind == "files":
        uris = {src.scheme + u: src.modified.get(u, math.nan) for u in src.units}
        total = len(uris)
        todo = [u for u in uris if u not in done]
        pre_skipped = total - len(todo)
        # small blocks: steady commits, bounded memory; and at least one per encoder, so a small folder uses them all
        blocks = max(1, min(len(todo), max(len(todo) // (4 * config.batch_size), int(cpus) + gpus)))
        ds = ray.data.from_items([{"uri": u, "modified": uris[u]} for u in todo], override_num_blocks=blocks)
    else:
        reader = sources.parquet_rows if src.kind == "parquet" else sources.tar_rows
        total, pre_skipped = sources.count_rows(src), 0
        ds = ray.data.from_items(src.units).flat_map(lambda row, r=reader, s=src: list(r(s, row["item"])),
                                                     num_cpus=0.25)  # what the encoders leave free
    writer = Writer(db, level0.fingerprint, dim, set(known), stored, run, config.flush_rows)
    writer.skipped = pre_skipped
    startup: float | None = None
    bar = tqdm(total=total, initial=pre_skipped, desc="index", unit="img", mininterval=1)
    if total != pre_skipped:
        # what the tasks skip without decoding; past SHIP_MAX ids the sets stay here (every task would carry them)
        # and a duplicate is decoded, encoded and then dropped by the writer
        ship = len(known) + len(done) <= SHIP_MAX
        decode = {"preprocess_cfg": pp_cfg, "known": known if ship else set(),
                  "done": done if ship or src.kind != "files" else set()}
        if gpus:  # CPU tasks decode, one actor per GPU encodes
            ds = ds.map_batches(decode_batch, batch_size=config.batch_size, num_cpus=0.5,
                                fn_kwargs={**decode, "device_jpegs": True})
            ds = ds.map_batches(EmbedBatches,
                                fn_constructor_kwargs={"spec": spec, "threads": max(1, int(cpus) // gpus)},
                                compute=ray.data.ActorPoolStrategy(size=gpus), batch_size=config.batch_size,
                                num_gpus=1, num_cpus=1)
        else:  # one decode-and-encode actor per free core, one thread each; a quarter core each left for readers
            # (free, not total: a served database's replicas may hold part of the cluster, and an actor the pool
            # waits for that never fits would stall the job)
            free = ray.available_resources().get("CPU", cpus)
            share = min(0.75, max(free, 0.1))
            actors = max(1, min(int(cpus), int(free / share)))
            ds = ds.map_batches(DecodeEmbedBatches,
                                fn_constructor_kwargs={"spec": spec, "threads": 1, "decode": decode},
                                compute=ray.data.ActorPoolStrategy(size=actors),
                                batch_size=config.batch_size, num_cpus=share)
        for batch in ds.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            startup = startup if startup is not None else time.perf_counter() - t0
            writer.add(batch)
            bar.update(len(batch["uri"]))
    writer.flush()
    bar.close()
    # a pass that changed nothing (--watch's usual one) rebuilds nothing: only indexes still missing are built
    changed = bool(writer.new_rows or removed)
    if changed or not keywords.current(db):
        log.debug("compacting %s and %s, then building indexes", tables.IMAGES, emb)
        db.finish([tables.IMAGES, emb])
        keywords.build(db)
        filters.build_indexes(db, min_rows=config.filter_index_min_rows)
    ann = db.vector_index(emb) if db.has(emb) else None
    if db.has(emb) and (changed or ann is None):
        params = db.build_ann(level0.fingerprint, min_rows=config.ann_min_rows)
        ann = params.index_type if params else None
    rows = db.count(emb)
    seconds = time.perf_counter() - t0
    report = IndexReport(rows=rows, new_rows=writer.new_rows, errors=writer.error_count, skipped=writer.skipped,
                         ignored=sum(src.ignored.values()), seconds=round(seconds, 2),
                         images_per_s=round(writer.new_rows / seconds, 2),
                         startup_s=round(startup, 2) if startup is not None else None,
                         table_version=db.version(emb), table=emb,
                         model=spec.name, ladder=resolved.name, ann=ann or "exact",
                         gone=len(synced.gone), changed=len(synced.changed), removed=removed)
    db.append(tables.RUNS, tables.RUNS_SCHEMA, [{"run": run, "source": source, "model": spec.name,
                                                 "fingerprint": level0.fingerprint, "status": "done", "rows": rows,
                                                 "new_rows": writer.new_rows, "errors": writer.error_count,
                                                 "started": time.time() - seconds, "finished": time.time()}])
    return report
