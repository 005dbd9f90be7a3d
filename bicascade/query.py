"""The query path without Ray: resolving a ladder's levels (fingerprints, costs, text towers), the ladder a
database remembers, encoding stored images by id, and the in-process cascade. `bicascade search`, `eval` and
`simulate` run on this alone; the Serve deployments in `actors/` are built on it (the ingress and its Router on
`bicascade.levels` only, which needs no torch)."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np

from bicascade import costs, images, models, registry
from bicascade.cascade import Cascade, Level, default_cutoffs, validate
from bicascade.errors import BadInputError, MissingWeightsError, NotIndexedError
from bicascade.levels import LevelInfo, ResolvedLadder
from bicascade.protocol import SearchRequest, SearchResponse, answer
from bicascade.storage import cache, filters, keywords, tables

log = logging.getLogger("bicascade")


def level_infos(specs: Sequence[models.ModelSpec]) -> list[LevelInfo]:
    """Fingerprints, dims, costs and shared text towers of a ladder's levels (reads checkpoints, loads nothing)."""
    towers = [models.text_identity(s) for s in specs]
    out = []
    for spec, tower in zip(specs, towers):
        pp_cfg, dim = models.preprocessing(spec)
        out.append(LevelInfo(spec, models.fingerprint(spec, pp_cfg), dim, costs.image_gflops(spec),
                             towers.index(tower)))
    return out


def registered(name: str) -> ResolvedLadder:
    ladder = registry.get_ladder(name)
    return ResolvedLadder(ladder.name, level_infos([registry.get_model(n) for n in ladder.levels]))


def recorded(db: tables.Database) -> ResolvedLadder | None:
    """The ladder the database was indexed with, checked against the checkpoints as they are now."""
    rows = db.recorded_ladder()
    if not rows:
        return None
    specs = [models.ModelSpec(**json.loads(r["model"])) for r in rows]
    try:
        infos = level_infos(specs)
    except MissingWeightsError as e:
        raise MissingWeightsError(f"{db.uri} was indexed with ladder {rows[0]['ladder']!r}, but {e}") from None
    for r, info in zip(rows, infos):
        if r["fingerprint"] != info.fingerprint:
            raise MissingWeightsError(f"the weights of {info.name} changed since {db.uri} recorded them "
                                      f"(fingerprint {info.fingerprint}, recorded {r['fingerprint']}): restore the "
                                      f"checkpoint {info.spec.checkpoint or ''} or index into a new database")
    return ResolvedLadder(rows[0]["ladder"], infos)


def open_ladder(db: tables.Database, name: str | None) -> ResolvedLadder:
    """The ladder to run on `db`: the one it remembers, or `name` (which must share its level 0)."""
    have = recorded(db)
    if name is None:
        if have is None:
            raise NotIndexedError(f"{db.uri} has not been indexed: run `bicascade index SOURCE --db {db.uri} "
                                  "--ladder NAME` first")
        return have
    want = registered(name)
    if have is not None:
        check_level0(db, have, want)
    return want


def check_level0(db: tables.Database, have: ResolvedLadder, want: ResolvedLadder) -> None:
    _same_level0(db, have.name, have.levels[0].name, have.levels[0].fingerprint, want)


def _same_level0(db: tables.Database, ladder: str, model: str, fingerprint: str, want: ResolvedLadder) -> None:
    if fingerprint != want.levels[0].fingerprint:
        raise BadInputError(f"{db.uri} was indexed with level 0 {model} (ladder {ladder!r}); ladder {want.name!r} "
                            f"starts with {want.levels[0].name}: index into a new database, or use a ladder whose "
                            f"level 0 is {model} (its upper levels may differ)")


def record(db: tables.Database, ladder: ResolvedLadder, replace_level0: bool = False) -> None:
    """Remember `ladder` as the database's (the index job calls this before writing any row; a migration, which
    has built the new level-0 table, may replace level 0)."""
    rows = db.recorded_ladder()
    if rows:
        if not replace_level0:
            _same_level0(db, rows[0]["ladder"], json.loads(rows[0]["model"])["name"], rows[0]["fingerprint"], ladder)
        if [r["fingerprint"] for r in rows] == [lv.fingerprint for lv in ladder.levels]:
            return
        log.info("%s now serves ladder %s (was %s): changed upper levels get new cache tables", db.uri, ladder.name,
                 rows[0]["ladder"])
    db.record_ladder([{"level": j, "ladder": ladder.name, "model": json.dumps(asdict(lv.spec)),
                       "fingerprint": lv.fingerprint, "dim": lv.dim} for j, lv in enumerate(ladder.levels)])


ENCODE_CHUNK = 32  # images read, decoded and encoded at a time: memory stays bounded by two chunks of photos
_DECODERS = ThreadPoolExecutor(2, thread_name_prefix="bicascade-decode")  # PIL and LanceDB release the GIL
_READER = ThreadPoolExecutor(4, thread_name_prefix="bicascade-read")  # the next chunk, while this one encodes


def encode_stored(model: models.LoadedModel, db: tables.Database, ids: list[str]) -> np.ndarray:
    """Encode images by id from the `images` table (their bytes never travel through the router), a chunk at a
    time, the next chunk read and decoded (in parallel) while this one is encoded."""
    def crops(chunk: list[str]) -> np.ndarray:
        blobs = db.image_bytes(chunk)
        missing = [i for i in chunk if i not in blobs]
        if missing:
            raise NotIndexedError(f"{len(missing)} ids are not in {db.uri}/{tables.IMAGES}, e.g. {missing[0]}")
        return np.stack(list(_DECODERS.map(lambda i: model.preprocess.crop(images.decode(blobs[i]).rgb), chunk)))

    out = np.zeros((len(ids), model.dim), np.float32)
    chunks = [ids[s:s + ENCODE_CHUNK] for s in range(0, len(ids), ENCODE_CHUNK)]
    ahead = _READER.submit(crops, chunks[0]) if chunks else None
    for n, chunk in enumerate(chunks):
        pixels = ahead.result()
        ahead = _READER.submit(crops, chunks[n + 1]) if n + 1 < len(chunks) else None
        out[n * ENCODE_CHUNK:n * ENCODE_CHUNK + len(chunk)] = model.encode_crops(pixels)
    return out



class LocalSearch:
    """The cascade in this process: models loaded here, caches written back directly (call `close` at the end)."""

    def __init__(self, db_uri: str, ladder: str | None = None, cutoffs: Sequence[int] | None = None,
                 device: str | None = None) -> None:
        self.db = tables.Database(db_uri)
        self.ladder = open_ladder(self.db, ladder)
        infos = self.ladder.levels
        cutoffs = tuple(cutoffs) if cutoffs is not None else default_cutoffs(len(infos))
        validate(len(infos), cutoffs)
        self.corpus = cache.Corpus(self.db, infos[0].fingerprint)
        self.stores: list[cache.LevelCache] = []
        levels: list[Level] = []
        self.models: list[models.LoadedModel] = []
        for j, info in enumerate(infos):
            model = models.load_model(info.spec, device=device)
            store = cache.LevelCache(self.db, info.fingerprint, info.dim) if j else None
            # a shared text tower is one callable, which the cascade calls once per query
            text = levels[info.text].encode_text if info.text < j else model.encode_texts
            levels.append(Level(info.name, text, lambda ids, m=model: encode_stored(m, self.db, ids),
                                cache=store, gflops=info.gflops))
            self.models.append(model)
            self.stores += [store] if store else []
        # the full cascade and the shallower ones over the same levels and caches (depth 1 is level 0 alone)
        self.by_depth = {d: Cascade(self.corpus, levels[:d], cutoffs[:d - 1]) for d in range(1, len(levels) + 1)}

    @property
    def cascade(self) -> Cascade:
        return self.by_depth[len(self.by_depth)]

    def search(self, req: SearchRequest) -> SearchResponse:
        depth = req.depth_of(len(self.by_depth))
        cascade = self.by_depth[depth]
        validate(depth, cascade.cutoffs, req.k)  # in process, a k the cascade cannot rank is an error, not clamped
        if req.mode == "keyword":  # the keyword index alone: no embedding
            vectors = []
        elif req.query is not None:
            vectors = cascade.text_vectors(req.query)
        elif req.image is not None:  # more like this picture: each level embeds it with its own image tower
            picture = images.decode(req.image, max_pixels=images.MAX_UPLOAD_PIXELS).rgb
            vectors = [m.encode_images([picture])[0] for m in self.models[:depth]]
        else:  # an indexed image: its stored and cached vectors (computed and written back where missing)
            try:
                vectors = [self.corpus.vectors([req.image_id])[0]]
            except KeyError:
                raise NotIndexedError(f"no indexed image {req.image_id!r}") from None
            vectors += [cascade.embeddings(level, [req.image_id])[0][0] for level in cascade.levels[1:]]
        ids = filters.matching(self.db, req.where) if req.where else None  # once, for both searches
        allowed, matches = (self.corpus.allow(ids), set(ids)) if ids is not None else (None, None)
        return answer(cascade, req, vectors, allowed, self.ladder.names,
                      cascade.text_encodes if req.query is not None else 0, self.db.uris, self.corpus.vectors,
                      lambda text, n: keywords.search(self.db, text, n, matches))

    def close(self) -> None:
        for store in self.stores:
            store.flush()
