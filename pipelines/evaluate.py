"""Text-to-image recall of every ladder level and of cascades on the world's held-out test split (Table 1's shape)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bicascade import costs, images, models
from bicascade.pipelines import world
from bicascade.storage import tables

log = logging.getLogger("bicascade")
KS = (1, 5, 10)


def embed_images(loaded: models.LoadedModel, paths: Sequence[str], batch: int = 256) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(paths), batch), desc=f"images {loaded.spec.name}", unit="batch", leave=False):
        pixels = []
        for p in paths[i:i + batch]:
            with Image.open(p) as im:
                pixels.append(loaded.preprocess(im.convert("RGB")))
        out.append(loaded.encode_pixels(torch.stack(pixels)))
    return np.concatenate(out)


def embed_texts(loaded: models.LoadedModel, texts: Sequence[str], batch: int = 1024) -> np.ndarray:
    return np.concatenate([loaded.encode_texts(texts[i:i + batch]) for i in range(0, len(texts), batch)])


def cascade_topk(text: Sequence[np.ndarray], images: Sequence[np.ndarray], cutoffs: Sequence[int],
                 k: int) -> np.ndarray:
    """Algorithm 1 for many queries at once: (n_queries, k) image indices. Equal to `Cascade.search` per query."""
    s0 = text[0] @ images[0].T
    m0 = cutoffs[0] if cutoffs else k
    cand = np.argsort(-s0, axis=1, kind="stable")[:, :m0]  # stable sort: ties go to the lower index
    for q, im, m in zip(text[1:], images[1:], cutoffs):
        cand = cand[:, :m]
        scores = np.einsum("qd,qmd->qm", q, im[cand])
        cand = np.take_along_axis(cand, np.argsort(-scores, axis=1, kind="stable"), axis=1)
    return cand[:, :k]


def recall(topk: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    hit = topk == truth[:, None]
    return {str(k): float(hit[:, :k].any(axis=1).mean()) for k in KS}


def indexed_vectors(db_uri: str, loaded: models.LoadedModel, paths: Sequence[str]) -> np.ndarray:
    """Level-0 vectors of the test images as `bicascade index` stored them (matched by content id, like the job)."""
    ids = [images.content_id(Path(p).read_bytes()) for p in paths]
    try:
        return tables.Database(db_uri).vectors(loaded.fingerprint, ids)
    except KeyError as e:
        raise ValueError(f"{e.args[0]}: index the world's test split first "
                         f"(bicascade index {Path(paths[0]).parent} --db {db_uri})") from None


def evaluate(world_root: str | Path, ladder: models.Ladder, cutoffs: Sequence[int] = (50, 14), p: float = 0.1,
             device: str | None = None, db: str | None = None) -> dict:
    """Recall@1/5/10 per level and per cascade; every test caption is a query whose one relevant item is its image.
    With `db`, level 0 ranks the vectors the index job stored there; the upper levels embed in process."""
    paths, caps = world.load_split(world_root, "test")
    queries = [c for cs in caps for c in cs]
    truth = np.repeat(np.arange(len(paths)), [len(cs) for cs in caps])
    images, texts, gflops = [], [], []
    towers = models.text_encoders(ladder.levels)
    for j, name in enumerate(ladder.levels):
        loaded = models.load_model(name, device=device)
        images.append(indexed_vectors(db, loaded, paths) if db and j == 0 else embed_images(loaded, paths))
        texts.append(texts[towers[j]] if towers[j] < j else embed_texts(loaded, queries))  # a shared tower: once
        gflops.append(costs.image_gflops(name))
    n = len(ladder.levels)
    chunks = range(0, len(queries), 2048)

    def run(levels: list[int], m: list[int]) -> dict[str, float]:
        top = np.concatenate([cascade_topk([texts[j][i:i + 2048] for j in levels], [images[j] for j in levels], m,
                                           max(KS)) for i in chunks])
        return recall(top, truth)

    doc = {"queries": len(queries), "images": len(paths), "p": p, "db": db,
           "levels": [{"model": name, "gflops": gflops[j], "recall": run([j], [])}
                      for j, name in enumerate(ladder.levels)], "cascades": [],
           "text": {"encodes_per_query": len(set(towers)), "levels": n,
                    "gflops_per_query": sum(costs.text_gflops(ladder.levels[t]) for t in set(towers)),
                    "gflops_per_query_unshared": sum(costs.text_gflops(name) for name in ladder.levels)}}
    plans = [([j, n - 1], [cutoffs[0]]) for j in range(n - 1)] + ([(list(range(n)), list(cutoffs[:n - 1]))] if n > 2 else [])
    for levels, m in plans:
        doc["cascades"].append({"cascade": [ladder.levels[j] for j in levels], "m": m, "recall": run(levels, m),
                                "f_life": costs.f_life([gflops[j] for j in levels], p)})
    return doc


def format_table(doc: dict) -> str:
    lines = [f"{doc['queries']} queries over {doc['images']} test images; F_life by Eq. 1 with p = {doc['p']}",
             f"{'model / cascade':<52} {'m':<8} {'GFLOPs':>8} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'F_life':>7}"]
    for lv in doc["levels"]:
        r = lv["recall"]
        lines.append(f"{lv['model']:<52} {'':<8} {lv['gflops']:>8.4f} {r['1']:>6.3f} {r['5']:>6.3f} {r['10']:>6.3f}")
    for c in doc["cascades"]:
        r = c["recall"]
        lines.append(f"{' -> '.join(c['cascade']):<52} {','.join(map(str, c['m'])):<8} {'':>8} "
                     f"{r['1']:>6.3f} {r['5']:>6.3f} {r['10']:>6.3f} {c['f_life']:>7.2f}")
    t = doc["text"]
    lines.append(f"text side of the full cascade: {t['encodes_per_query']} embedding(s) per query, "
                 f"{t['gflops_per_query']:.4f} GFLOPs ({t['gflops_per_query_unshared']:.4f} with one per level)")
    return "\n".join(lines)
