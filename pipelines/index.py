"""`bicascade index`: a resumable Ray Data job that embeds a corpus with the ladder's cheapest level into LanceDB.

read (driver lists the source) -> decode + preprocess (CPU tasks, per-image try/except) -> encode (actor pool,
a GPU per actor when present) -> the driver, the single writer, commits bounded batches to LanceDB.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from bicascade import images, models
from bicascade.pipelines import sources
from bicascade.storage import tables

log = logging.getLogger("bicascade")


@dataclass
class IndexConfig:
    batch_size: int = 64  # images per encoder call
    flush_rows: int = 1024  # rows per LanceDB commit
    ann_min_rows: int = 100_000  # below this, exact search beats an ANN index


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one sized to this machine."""
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if not os.environ.get("RAY_ADDRESS"):
            kwargs["num_cpus"] = os.cpu_count()
        ray.init(**kwargs)


def decode_batch(batch: dict[str, np.ndarray], preprocess_cfg: dict, known: set[str], done: set[str]) -> dict:
    """Read, hash, decode and preprocess each image on its own: a bad file never takes its block down."""
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    size = preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)  # open_clip gives an int for ResNets
    out: dict[str, list] = {k: [] for k in ("uri", "id", "status", "stage", "error", "bytes", "width", "height",
                                            "caption", "meta", "pixels")}
    n = len(batch["uri"])
    for i in range(n):
        uri = str(batch["uri"][i])
        row = {"uri": uri, "id": "", "status": "new", "stage": "", "error": "", "bytes": b"", "width": 0,
               "height": 0, "caption": _opt(batch, "caption", i), "meta": _opt(batch, "meta", i),
               "pixels": np.zeros((3, *size), np.float16)}
        stage = "read"
        try:
            if uri in done:
                row["status"] = "done"
            else:
                data = _opt(batch, "bytes", i)
                if data is None:
                    fs, path = sources.filesystem(uri)
                    with fs.open_input_file(path) as f:
                        data = f.read()
                row["id"] = images.content_id(data)
                if row["id"] in known:
                    row["status"] = "known"
                else:
                    stage = "decode"
                    rgb = images.to_rgb(images.decode(data))
                    stage = "preprocess"
                    row.update(bytes=images.stored_bytes(data, rgb), width=rgb.width, height=rgb.height,
                               pixels=transform(rgb).to(torch.float16).numpy())
        except Exception as e:  # noqa: BLE001 - every failure is recorded per image, with its stage
            row.update(status="error", stage=stage, error=f"{type(e).__name__}: {e}"[:500])
        for k, v in row.items():
            out[k].append(v)
    result = {k: np.array(v, dtype=object) for k, v in out.items() if k != "pixels"}
    result["pixels"] = np.stack(out["pixels"])
    return result


def _opt(batch: dict, key: str, i: int) -> Any:
    if key not in batch:
        return None
    value = batch[key][i]
    return None if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)) else value


class Encoder:
    """Ray Data callable class: loads level 0 once per actor, encodes the new images of each batch."""

    def __init__(self, spec: models.ModelSpec, threads: int | None) -> None:
        models.set_threads(threads)
        self.model = models.load_model(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = batch.pop("pixels")
        new = np.flatnonzero(batch["status"] == "new")
        vectors = np.zeros((len(pixels), self.model.dim), np.float32)
        if len(new):
            vectors[new] = self.model.encode_pixels(torch.from_numpy(pixels[new].astype(np.float32)))
        batch["vector"] = vectors
        return batch


class Writer:
    """The job's single writer: bounded batched commits, a row never written twice, the ledger written last."""

    def __init__(self, db: tables.Database, fingerprint: str, dim: int, known: set[str], run: str, flush_rows: int):
        self.db, self.emb, self.schema = db, tables.emb_table(fingerprint), tables.emb_schema(dim)
        self.known, self.run, self.flush_rows = known, run, flush_rows
        self.images: list[dict] = []
        self.vectors: list[np.ndarray] = []
        self.ledger: list[dict] = []
        self.errors: list[dict] = []
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
                if status == "new" and id_ not in self.known:
                    self.known.add(id_)
                    self.images.append({"id": id_, "uri": uri, "bytes": bytes(batch["bytes"][i]),
                                        "width": int(batch["width"][i]), "height": int(batch["height"][i]),
                                        "caption": _opt(batch, "caption", i), "meta": _opt(batch, "meta", i)})
                    self.vectors.append(batch["vector"][i])
                    self.new_rows += 1
                else:  # the same bytes again: one row, this uri only joins the ledger
                    self.skipped += 1
                self.ledger.append({"uri": uri, "id": id_})
        if len(self.ledger) + len(self.errors) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.images:
            self.db.insert_new(tables.IMAGES, tables.IMAGES_SCHEMA, pa.Table.from_pylist(self.images, tables.IMAGES_SCHEMA))
            ids = pa.array([r["id"] for r in self.images], pa.string())
            vec = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(self.vectors).ravel(), pa.float32()),
                                                    self.schema.field("vector").type.list_size)
            self.db.insert_new(self.emb, self.schema, pa.Table.from_arrays([ids, vec], schema=self.schema))
        self.db.append(tables.ERRORS, tables.ERRORS_SCHEMA, self.errors)
        self.db.append(tables.SOURCES, tables.SOURCES_SCHEMA, self.ledger)
        self.images, self.vectors, self.ledger, self.errors = [], [], [], []


def run_index(source: str, db_uri: str, ladder: str | None = None, config: IndexConfig = IndexConfig()) -> dict:
    """Index `source` into `db_uri` with level 0 of `ladder`; rerunning adds only what is missing."""
    import ray
    import ray.data

    from bicascade.pipelines import train

    t0 = time.perf_counter()
    src = sources.list_source(source)
    if not src.units:
        raise ValueError(f"source has no images ({', '.join(sources.IMAGE_EXTS)}), parquet or .tar files: {source}")
    name = train.ensure_ladder(ladder or train.DEFAULT_LADDER, with_world=False)[0].levels[0]
    spec = models.get_model(name)
    pp_cfg, dim = models.describe(spec)
    fingerprint = models.fingerprint(spec, pp_cfg)
    db = tables.Database(db_uri)
    emb = tables.emb_table(fingerprint)
    known = db.ids(emb)
    done = db.done_uris(known)
    run = uuid.uuid4().hex[:12]
    log.info("indexing %s (%s, %d units) into %s with %s [%s]", source, src.kind, len(src.units), db_uri, name, emb)

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours below says images/s and ETA
    cpus = ray.cluster_resources().get("CPU", 1)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or max(1, int(cpus // 4))
    if src.kind == "files":
        uris = [src.scheme + u for u in src.units]
        total = len(uris)
        todo = [u for u in uris if u not in done]
        pre_skipped = total - len(todo)
        blocks = max(1, len(todo) // (4 * config.batch_size))  # small blocks: steady commits, bounded memory
        ds = ray.data.from_items([{"uri": u} for u in todo], override_num_blocks=blocks)
    else:
        reader = sources.parquet_rows if src.kind == "parquet" else sources.tar_rows
        total, pre_skipped = sources.count_rows(src), 0
        ds = ray.data.from_items(src.units).flat_map(lambda row, r=reader, s=src: list(r(s, row["item"])))
    writer = Writer(db, fingerprint, dim, set(known), run, config.flush_rows)
    writer.skipped = pre_skipped
    startup: float | None = None  # seconds to the first encoded batch: worker start-up, imports, model loads
    bar = tqdm(total=total, initial=pre_skipped, desc="index", unit="img", mininterval=1)
    if total != pre_skipped:
        ds = ds.map_batches(decode_batch, batch_size=config.batch_size, num_cpus=0.5,
                            fn_kwargs={"preprocess_cfg": pp_cfg, "known": known, "done": done})
        ds = ds.map_batches(Encoder, fn_constructor_kwargs={"spec": spec, "threads": max(1, int(cpus) // actors)},
                            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=config.batch_size,
                            num_gpus=1 if gpus else 0, num_cpus=1)
        for batch in ds.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            startup = startup if startup is not None else time.perf_counter() - t0
            writer.add(batch)
            bar.update(len(batch["uri"]))
    writer.flush()
    bar.close()
    db.finish([tables.IMAGES, emb])
    plan = db.build_ann(fingerprint, min_rows=config.ann_min_rows) if db.has(emb) else None
    rows = db.db.open_table(emb).count_rows() if db.has(emb) else 0
    seconds = time.perf_counter() - t0
    doc = {"rows": rows, "new_rows": writer.new_rows, "errors": writer.error_count, "skipped": writer.skipped,
           "seconds": round(seconds, 2), "images_per_s": round(writer.new_rows / seconds, 2),
           "startup_s": round(startup, 2) if startup is not None else None,
           "table_version": db.db.open_table(emb).version if db.has(emb) else 0,
           "table": emb, "model": name, "ann": plan.index_type if plan else "exact"}
    db.append(tables.RUNS, tables.RUNS_SCHEMA, [{"run": run, "source": source, "model": name, "fingerprint": fingerprint,
                                                 "status": "done", "rows": rows, "new_rows": writer.new_rows,
                                                 "errors": writer.error_count, "started": time.time() - seconds,
                                                 "finished": time.time()}])
    return doc
