"""Text-to-image recall of every ladder level and of cascades (Table 1's shape) on held-out queries with known
answers: the world's test split, or a user's file of labelled queries over their own database."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bicascade import costs, images, models
from bicascade.cascade import default_cutoffs, f_life, validate
from bicascade.errors import BadInputError, NotIndexedError
from bicascade.levels import ResolvedLadder
from bicascade.pipelines.lab import world
from bicascade.protocol import Plan
from bicascade.query import encode_stored
from bicascade.storage import tables

log = logging.getLogger("bicascade")
KS = (1, 5, 10)


def embed_images(loaded: models.LoadedModel, paths: Sequence[str], batch: int = 256) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(paths), batch), desc=f"images {loaded.spec.name}", unit="batch", leave=False):
        out.append(loaded.encode_images([images.decode_file(p).rgb for p in paths[i:i + batch]]))
    return np.concatenate(out) if out else np.zeros((0, loaded.dim), np.float32)


def embed_texts(loaded: models.LoadedModel, texts: Sequence[str], batch: int = 1024) -> np.ndarray:
    return np.concatenate([loaded.encode_texts(texts[i:i + batch]) for i in range(0, len(texts), batch)])


def cascade_topk(text: Sequence[np.ndarray], vectors: Sequence[np.ndarray], cutoffs: Sequence[int],
                 k: int, margin: float | None = None) -> np.ndarray:
    """Algorithm 1 for many queries at once: (n_queries, k) image indices. Equal to `Cascade.search` per query."""
    first = level0(text[0], vectors[0], cutoffs[0] if cutoffs else k)
    return cascade_ranked(first, text[1:], vectors[1:], cutoffs, k, margin)[0]


Ranked = tuple[np.ndarray, np.ndarray]  # (Q, m) image indices and their scores, best first


def level0(text: np.ndarray, vectors: np.ndarray, m: int, chunk: int = 1024) -> Ranked:
    """Every query's level-0 top m (indices, scores), best first: shared by every cascade tried."""
    cands, scores = [], []
    m = min(m, len(vectors))
    for start in range(0, len(text), chunk):
        s0 = text[start:start + chunk] @ vectors.T
        cand = np.argpartition(-s0, m - 1, axis=1)[:, :m] if m < len(vectors) else np.tile(np.arange(m), (len(s0), 1))
        prev = np.take_along_axis(s0, cand, axis=1)
        order = np.argsort(-prev, axis=1, kind="stable")
        cands.append(np.take_along_axis(cand, order, 1))
        scores.append(np.take_along_axis(prev, order, 1))
    return np.concatenate(cands), np.concatenate(scores)


def cascade_ranked(first: Ranked, texts: Sequence[np.ndarray], vectors: Sequence[np.ndarray], cutoffs: Sequence[int],
                   k: int, margin: float | None = None) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Algorithm 1 for many queries from their level-0 ranking `first` (fixed or adaptive cutoffs): (top-k image
    indices, per level >= 1 a mask of the images that reached it, per level >= 1 the mean candidates a query sent
    there). `texts` and `vectors` are of the levels above 0."""
    n = len(vectors[0]) if vectors else 0
    cand, prev = first
    cand, prev = cand[:, :cutoffs[0] if cutoffs else k], prev[:, :cutoffs[0] if cutoffs else k]
    reached, sent = [], []
    for qj, im, m in zip(texts, vectors, cutoffs):
        m = min(m, cand.shape[1])
        if margin is None:
            width = np.full(len(cand), m)
        else:  # within `margin` of the k-th best at the previous level, but no fewer than k and no more than m
            kth = prev[:, min(k, prev.shape[1]) - 1:min(k, prev.shape[1])]
            width = np.clip((prev >= kth - margin).sum(1), min(k, m), m)
        cand = cand[:, :m]
        live = np.arange(m)[None, :] < width[:, None]
        mask = np.zeros(n, bool)
        mask[cand[live]] = True
        reached.append(mask)
        sent.append(float(width.mean()))
        scores = np.einsum("qd,qmd->qm", qj, im[cand])
        scores[~live] = -np.inf  # not sent on: ranked after every candidate that was
        order = np.argsort(-scores, axis=1, kind="stable")
        cand, prev = np.take_along_axis(cand, order, 1), np.take_along_axis(scores, order, 1)
    return cand[:, :k], reached, sent


def recall(topk: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Recall@k: the share of queries with a relevant image in their top k (`relevant`: (Q, R) image indices, -1
    padded)."""
    hit = (topk[:, :, None] == relevant[:, None, :]).any(axis=2)
    return {str(k): float(hit[:, :k].any(axis=1).mean()) for k in KS}


@dataclass
class HeldOut:
    """Queries with known answers over a corpus: a world's test split (each caption's one relevant image is the one it
    describes), or a user's labelled queries over everything their database indexed."""

    ids: list[str]  # the corpus, by content id as indexed
    queries: list[str]
    relevant: np.ndarray  # (queries, R) corpus indices of each query's relevant images, -1 padded
    paths: list[str] | None = None  # the corpus's files (a world's); else images are read from the database
    indexed_from: str = ""  # what `bicascade index` needs to have read for this corpus


def world_heldout(root: str | Path, captions_per_image: int | None = None) -> HeldOut:
    """The world's test split: every caption (or the first `captions_per_image` of each image's) is a query."""
    paths, caps = world.load_split(root, "test")
    caps = [c[:captions_per_image] for c in caps] if captions_per_image else caps
    ids = [images.content_id(Path(p).read_bytes()) for p in paths]
    first = np.repeat(np.arange(len(paths)), [len(c) for c in caps])
    return HeldOut(ids, [c for cs in caps for c in cs], first[:, None], paths, str(Path(paths[0]).parent))


def labelled_heldout(db: tables.Database, path: str | Path) -> HeldOut:
    """A user's queries over their whole database: JSON lines `{"query": "...", "relevant": [image, ...]}`, an image
    named by its id, by the uri it was indexed from, or by a local path (relative to the file's folder)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read labelled queries {path}: {e}") from None
    ids = db.column(tables.IMAGES, "id")
    if not ids:
        raise NotIndexedError(f"{db.uri} holds no images: `bicascade index SOURCE --db {db.uri}` first")
    ledger = db.dataset(tables.SOURCES).to_table(columns=["uri", "id"]) if db.has(tables.SOURCES) else None
    by_uri = dict(zip(ledger.column("uri").to_pylist(), ledger.column("id").to_pylist())) if ledger else {}
    index = {i: n for n, i in enumerate(ids)}

    def image(ref: object, where: str) -> int:
        if isinstance(ref, str):
            local = os.path.abspath(path.parent / ref) if "://" not in ref else ref
            for key in (ref, by_uri.get(ref), by_uri.get(local)):
                if key in index:
                    return index[key]
        raise BadInputError(f"{where}: relevant image {ref!r} is not in {db.uri} (give an image id, the uri it was "
                            "indexed from, or its path)")

    queries, relevant = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BadInputError(f"{where}: not JSON ({e})") from None
        if not (isinstance(row, dict) and isinstance(row.get("query"), str) and row["query"].strip()
                and isinstance(row.get("relevant"), list) and row["relevant"]):
            raise BadInputError(f'{where}: expected {{"query": "text", "relevant": ["image", ...]}}')
        queries.append(row["query"])
        relevant.append(list(dict.fromkeys(image(r, where) for r in row["relevant"])))
    if not queries:
        raise BadInputError(f"{path} holds no queries")
    padded = np.full((len(queries), max(map(len, relevant))), -1)
    for q, r in enumerate(relevant):
        padded[q, :len(r)] = r
    return HeldOut(ids, queries, padded, indexed_from=db.last_source() or "your images")


def indexed_vectors(db_uri: str, fingerprint: str, held: HeldOut) -> np.ndarray:
    """Level-0 vectors of the corpus as `bicascade index` stored them (matched by content id, like the job)."""
    try:
        return tables.Database(db_uri).vectors(fingerprint, held.ids)
    except NotIndexedError as e:
        raise NotIndexedError(f"{e}: index {held.indexed_from} first (bicascade index {held.indexed_from} "
                              f"--db {db_uri})") from None


def embed_corpus(loaded: models.LoadedModel, held: HeldOut, db: str | None, limit: int | None = None) -> np.ndarray:
    """The corpus (its first `limit` images) through one level: from its files, else decoded from the database."""
    if held.paths is not None:
        return embed_images(loaded, held.paths[:limit])
    if db is None:
        raise BadInputError("labelled queries are evaluated over a database: pass --db")
    return encode_stored(loaded, tables.Database(db), held.ids[:limit])


def world_of(db: tables.Database | None, world_dir: str | Path | None) -> Path:
    """The world to evaluate on: `world_dir`, else the one whose test split the database indexed last."""
    if world_dir:
        root = Path(world_dir)
    else:
        source = db.last_source() if db is not None else None
        root = Path(source).parent if source and "://" not in source else None
        if root is None or not (root / "captions.parquet").exists():
            raise BadInputError("this database did not index a world's test split: measure your own queries with "
                                "--labels FILE (JSON lines {\"query\": ..., \"relevant\": [image, ...]}), or pass "
                                "--world DIR (a synthetic world, as `bicascade demo` writes it)")
    if not (root / "captions.parquet").exists():
        raise BadInputError(f"{root} is not a world: it has no captions.parquet")
    return root


def cascade_subsets(n: int, cutoffs: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The cascades of Table 1 over n levels: every [level, top] with m_1, then the whole ladder."""
    rows = [([j, n - 1], [cutoffs[0]]) for j in range(n - 1)]
    return rows + ([(list(range(n)), list(cutoffs[:n - 1]))] if n > 2 else [])


@dataclass
class LevelRecall:
    model: str
    gflops: float
    recall: dict[str, float]


@dataclass
class CascadeRecall:
    cascade: list[str]
    m: list[int]
    recall: dict[str, float]
    f_life: float
    adaptive_margin: float | None = None


@dataclass
class EvalReport:
    """The `bicascade eval` document: Recall@1/5/10 per level and cascade, and the text side's cost."""

    queries: int
    images: int
    p: float
    db: str | None
    levels: list[LevelRecall]
    cascades: list[CascadeRecall]
    text: dict

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"{self.queries} queries over {self.images} images; F_life by Eq. 1 with p = {self.p}",
                 f"{'model / cascade':<52} {'m':<8} {'GFLOPs':>8} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'F_life':>7}"]
        for lv in self.levels:
            r = lv.recall
            lines.append(f"{lv.model:<52} {'':<8} {lv.gflops:>8.4f} {r['1']:>6.3f} {r['5']:>6.3f} {r['10']:>6.3f}")
        for c in self.cascades:
            r = c.recall
            lines.append(f"{' -> '.join(c.cascade):<52} {','.join(map(str, c.m)):<8} {'':>8} "
                         f"{r['1']:>6.3f} {r['5']:>6.3f} {r['10']:>6.3f} {c.f_life:>7.2f}")
        t = self.text
        lines.append(f"text side of the full cascade: {t['encodes_per_query']} embedding(s) per query, "
                     f"{t['gflops_per_query']:.4f} GFLOPs ({t['gflops_per_query_unshared']:.4f} with one per level)")
        return "\n".join(lines)


def evaluate(held: HeldOut, ladder: ResolvedLadder, cutoffs: Sequence[int] | None = None, p: float = 0.1,
             device: str | None = None, db: str | None = None, plan: Plan | None = None) -> EvalReport:
    """Recall@1/5/10 per level and per cascade of the held-out queries. With `db`, level 0 ranks the vectors the index
    job stored there; the upper levels embed the corpus in process."""
    infos = ladder.levels
    cutoffs = list(cutoffs) if cutoffs is not None else list(default_cutoffs(len(infos)))
    validate(len(infos), cutoffs)
    queries = held.queries
    vectors, texts = [], []
    for j, info in enumerate(infos):
        loaded = models.load_model(info.spec, device=device)
        vectors.append(indexed_vectors(db, info.fingerprint, held) if db and j == 0 else embed_corpus(loaded, held, db))
        texts.append(texts[info.text] if info.text < j else embed_texts(loaded, queries))  # a shared tower: once
    chunks = range(0, len(queries), 2048)

    def recall_of(levels: list[int], m: list[int], margin: float | None = None) -> dict[str, float]:
        top = np.concatenate([cascade_topk([texts[j][i:i + 2048] for j in levels], [vectors[j] for j in levels], m,
                                           max(KS), margin) for i in chunks])
        return recall(top, held.relevant)

    towers = sorted({info.text for info in infos})
    subsets = [(levels, m, None) for levels, m in cascade_subsets(len(infos), cutoffs)]
    if plan is not None:  # the cascade `bicascade plan` chose, as the server would run it
        subsets.append((plan.levels([i.name for i in infos]), list(plan.cutoffs), plan.adaptive_margin))
    return EvalReport(
        queries=len(queries), images=len(held.ids), p=p, db=db,
        levels=[LevelRecall(info.name, info.gflops, recall_of([j], [])) for j, info in enumerate(infos)],
        cascades=[CascadeRecall([infos[j].name for j in levels], m, recall_of(levels, m, margin),
                                f_life([infos[j].gflops for j in levels], p, infos[-1].gflops), margin)
                  for levels, m, margin in subsets],
        text={"encodes_per_query": len(towers), "levels": len(infos),
              "gflops_per_query": sum(costs.text_gflops(infos[t].spec) for t in towers),
              "gflops_per_query_unshared": sum(costs.text_gflops(info.spec) for info in infos)})
