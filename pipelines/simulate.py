"""`bicascade simulate`: a p-small-world query stream over the world's held-out captions, replayed through the
real cascade (in process, or against a running server over HTTP), measuring lifetime cost, recall and latency
against the paper's Eq. 1 and Eq. 2.

The stream: the corpus is clustered into topics (k-means on the indexed level-0 vectors); topics get Zipf-like
popularity; a query picks a topic, one of its images and one of that image's captions (a paraphrase of the
last query on that image, not a repeat). The number of topics in play is chosen so that the union of the
queries' level-0 top-m_1 sets covers about a fraction p of the corpus: what the paper calls p.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import requests
from tqdm import tqdm

from bicascade import costs, images, models
from bicascade.actors.encoder import encode_stored
from bicascade.actors.router import ladder_levels
from bicascade.cascade import Cascade, DictCache, ExactIndex, Level
from bicascade.pipelines import evaluate, report, train, world
from bicascade.storage import tables

log = logging.getLogger("bicascade")
EARLY = 20  # queries that count as "early" (cold cache) for Eq. 2


@dataclass(frozen=True)
class SimConfig:
    p: float = 0.1
    queries: int = 10_000
    skew: float = 1.0  # Zipf exponent of topic popularity
    cutoffs: tuple[int, ...] = (50, 14)
    cascade: tuple[str, ...] | None = None  # model names, cheapest first; default the whole ladder
    k: int = 10
    seed: int = 0
    topic_size: int = 10  # images per topic (k-means clusters of level-0 vectors)
    url: str | None = None  # replay against this server instead of in process
    concurrency: int = 8


@dataclass
class Corpus:
    """The world's test split with everything the replays share: ids as indexed, captions, embeddings."""

    ids: list[str]
    captions: list[str]
    caption_image: np.ndarray  # image index of each caption
    names: list[str]  # ladder levels, cheapest first
    gflops: list[float]
    seconds: list[float]  # measured image-encoder seconds per image of each level (whole corpus, batched)
    images: list[np.ndarray]  # per level (N, d); level 0 as the index job stored it
    texts: list[np.ndarray]  # per level (captions, d)
    towers: list[int]  # per level, the first level with its text tower (levels sharing one embed a query once)
    text_gflops: list[float]
    models: list[models.LoadedModel]
    db: tables.Database

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclass
class Stream:
    caption: np.ndarray  # caption index per query
    truth: np.ndarray  # image index per query
    popularity: np.ndarray  # popularity rank of each query's topic (0 = the most asked)
    topics: int  # topics in play
    coverage: float  # measured: |union of level-0 top-m_1 sets| / N


@dataclass
class Trace:
    """What one replay measured, per query (levels are the cascade's, level 0 first)."""

    levels: list[int]  # ladder indices
    cutoffs: list[int]
    ms: np.ndarray
    candidates: np.ndarray  # (Q, L)
    hits: np.ndarray
    encoded: np.ndarray
    seconds: np.ndarray  # image-encoding seconds per level (HTTP: the level's server-side ms)
    rank: np.ndarray  # position of the query's image in the results, k when absent
    errors: int = 0
    wall_s: float = 0.0
    http: bool = False  # replayed against a server: ms is client-side latency
    server_encoded: np.ndarray | None = None  # per level: rows the server's caches gained during the replay


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """Cluster labels of unit vectors (spherical k-means; k-means++-free seeding from a seeded sample)."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        labels = np.argmax(x @ centres.T, axis=1)
        for c in range(k):
            members = x[labels == c]
            if len(members):
                v = members.sum(0)
                centres[c] = v / max(np.linalg.norm(v), 1e-12)
    return np.argmax(x @ centres.T, axis=1)


def top_sets(text: np.ndarray, img: np.ndarray, m: int, chunk: int = 2048) -> np.ndarray:
    """(queries, m) image indices of each text's level-0 top-m set (exact)."""
    out = [np.argpartition(-(text[i:i + chunk] @ img.T), m - 1, axis=1)[:, :m] for i in range(0, len(text), chunk)]
    return np.concatenate(out)


def make_stream(corpus: Corpus, cfg: SimConfig) -> Stream:
    """A reproducible stream whose level-0 top-m_1 sets cover about cfg.p of the corpus."""
    m1 = cfg.cutoffs[0]
    labels = kmeans(corpus.images[0], max(1, corpus.n // cfg.topic_size), cfg.seed)
    order = np.random.default_rng(cfg.seed).permutation(labels.max() + 1)  # popularity rank -> topic
    by_topic = [np.flatnonzero(labels[corpus.caption_image] == t) for t in order]
    by_topic = [c for c in by_topic if len(c)]
    tops = top_sets(corpus.texts[0], corpus.images[0], m1)

    def draw(topics: int) -> tuple[np.ndarray, np.ndarray, float]:
        rng = np.random.default_rng([cfg.seed, 1])
        weights = 1.0 / np.arange(1, topics + 1) ** cfg.skew
        picks = rng.choice(topics, size=cfg.queries, p=weights / weights.sum())
        caption = np.array([by_topic[t][rng.integers(len(by_topic[t]))] for t in picks])
        return caption, picks, len(np.unique(tops[np.unique(caption)])) / corpus.n

    lo, hi = 1, len(by_topic)  # coverage grows with the topics in play: bisect for the smallest reaching p
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if draw(mid)[2] >= cfg.p else (mid + 1, hi)
    best = min({max(1, lo - 1), lo}, key=lambda t: abs(draw(t)[2] - cfg.p))
    caption, picks, coverage = draw(best)
    return Stream(caption, corpus.caption_image[caption], picks, best, coverage)


def load_corpus(db_uri: str, ladder: str, world_root: str | Path, device: str | None = None) -> Corpus:
    paths, caps = world.load_split(world_root, "test")
    ids = [images.content_id(Path(p).read_bytes()) for p in paths]
    db = tables.Database(db_uri)
    infos = ladder_levels(ladder)
    try:
        level0 = db.vectors(infos[0].fingerprint, ids)
    except KeyError as e:
        raise ValueError(f"{e.args[0]}: index the world's test split first "
                         f"(bicascade index {Path(paths[0]).parent} --db {db_uri})") from None
    captions = [c for cs in caps for c in cs]
    loaded, embedded, texts, seconds = [], [], [], []
    for j, info in enumerate(infos):
        model = models.load_model(info.name, device=device)
        t0 = time.perf_counter()
        embedded.append(evaluate.embed_images(model, paths))
        seconds.append((time.perf_counter() - t0) / len(paths))
        texts.append(texts[info.text] if info.text < j else evaluate.embed_texts(model, captions))
        loaded.append(model)
    return Corpus(ids, captions, np.repeat(np.arange(len(paths)), [len(c) for c in caps]), [i.name for i in infos],
                  [i.gflops for i in infos], seconds, [level0] + embedded[1:], texts, [i.text for i in infos],
                  [costs.text_gflops(i.name) for i in infos], loaded, db)


def replay_local(corpus: Corpus, stream: Stream, levels: Sequence[int], cutoffs: Sequence[int], k: int) -> Trace:
    """Every query through Algorithm 1 in this process, caches cold at the start; images missed at a level are
    decoded from the database and encoded then (timed), as the server does."""
    spent = np.zeros(len(levels))

    def encoder(j: int, slot: int):
        def encode(ids: list[str]) -> np.ndarray:
            t0 = time.perf_counter()
            out = encode_stored(corpus.models[j], corpus.db, ids)
            spent[slot] += time.perf_counter() - t0
            return out
        return encode

    index = ExactIndex(corpus.ids, corpus.images[levels[0]])
    cascade = Cascade(index, [Level(corpus.names[j], corpus.models[j].encode_texts, encoder(j, s),
                                    DictCache() if s else None, corpus.gflops[j]) for s, j in enumerate(levels)],
                      list(cutoffs))
    q, nl = len(stream.caption), len(levels)
    trace = Trace(list(levels), list(cutoffs), np.zeros(q), np.zeros((q, nl), int), np.zeros((q, nl), int),
                  np.zeros((q, nl), int), np.zeros((q, nl)), np.full(q, k))
    t0 = time.perf_counter()
    name = " -> ".join(corpus.names[j] for j in levels)
    for i, c in enumerate(tqdm(stream.caption, desc=f"replay {name}", unit="q", mininterval=2, leave=False)):
        spent[:] = 0
        out = cascade.search(corpus.captions[c], k=k, text=[corpus.texts[j][c] for j in levels])
        trace.ms[i] = out.ms
        trace.candidates[i] = [s.candidates for s in out.levels]
        trace.hits[i] = [s.cache_hits for s in out.levels]
        trace.encoded[i] = [s.encoded for s in out.levels]
        trace.seconds[i] = spent
        ranked = [r.id for r in out.results]
        truth = corpus.ids[stream.truth[i]]
        trace.rank[i] = ranked.index(truth) if truth in ranked else k
    trace.wall_s = time.perf_counter() - t0
    return trace


def replay_http(corpus: Corpus, stream: Stream, url: str, k: int, concurrency: int) -> Trace:
    """The stream against a running server with at most `concurrency` requests in flight (a load generator)."""
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

    def one(c: int) -> tuple[float, dict | None]:
        t0 = time.perf_counter()
        try:
            r = session.post(f"{url.rstrip('/')}/search", json={"query": corpus.captions[c], "k": k}, timeout=300)
            doc = r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            doc = None
        return (time.perf_counter() - t0) * 1000, doc

    def cached() -> np.ndarray:
        return np.array([lv["cached"] for lv in session.get(f"{url.rstrip('/')}/stats", timeout=60).json()["levels"]])

    def settled() -> np.ndarray:
        """Cache rows once the writers have flushed (they flush by age within seconds): unchanged for 2 s."""
        last, now = cached(), None
        for _ in range(30):
            time.sleep(2)
            now = cached()
            if np.array_equal(now, last):
                break
            last = now
        return now

    before = cached()
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        answers = list(tqdm(pool.map(one, stream.caption), total=len(stream.caption), desc=f"replay {url}",
                            unit="q", mininterval=2, leave=False))
    wall = time.perf_counter() - t0
    nl = max((len(d["stats"]["levels"]) for _, d in answers if d), default=1)
    q = len(answers)
    trace = Trace(list(range(nl)), [], np.zeros(q), np.zeros((q, nl), int), np.zeros((q, nl), int),
                  np.zeros((q, nl), int), np.zeros((q, nl)), np.full(q, k), wall_s=wall, http=True)
    for i, (ms, doc) in enumerate(answers):
        trace.ms[i] = ms
        if doc is None:
            trace.errors += 1
            continue
        lv = doc["stats"]["levels"]
        trace.candidates[i] = [s["candidates"] for s in lv]
        trace.hits[i] = [s["cache_hits"] for s in lv]
        trace.encoded[i] = [s["encoded"] for s in lv]
        trace.seconds[i] = [s["ms"] / 1000 if j else 0.0 for j, s in enumerate(lv)]
        ranked = [r["id"] for r in doc["results"]]
        truth = corpus.ids[stream.truth[i]]
        trace.rank[i] = ranked.index(truth) if truth in ranked else k
    trace.cutoffs = [int(trace.candidates[trace.candidates[:, j] > 0, j].max(initial=0)) for j in range(1, nl)]
    # Per response, `encoded` counts the query's misses; concurrent queries missing the same image share one
    # encoding (in-flight de-dup) and each count it. The caches' growth counts every image once.
    trace.server_encoded = settled() - before
    return trace


def recall(rank: np.ndarray) -> dict[str, float]:
    return {str(k): float((rank < k).mean()) for k in evaluate.KS}


def summarise(corpus: Corpus, stream: Stream, trace: Trace, p: float) -> dict:
    """Measured lifetime cost (FLOPs and seconds) vs Eq. 1 at the measured coverage, recall, hit rates."""
    c = [corpus.gflops[j] for j in trace.levels]
    s = [corpus.seconds[j] for j in trace.levels]
    n = corpus.n
    encoded = trace.encoded.sum(0) if trace.server_encoded is None else trace.server_encoded
    uncascaded = n * corpus.gflops[-1]
    spent = n * c[0] + float(encoded[1:] @ np.array(c[1:]))
    spent_s = n * s[0] + float(trace.seconds[:, 1:].sum())
    q = len(trace.ms)
    tail = max(1, q // 10)
    per_query = trace.encoded[:, 1:] @ np.array(c[1:])
    hit = trace.hits[:, 1:].sum() / max(1, trace.candidates[:, 1:].sum())
    towers = {corpus.towers[j] for j in trace.levels}
    return {"cascade": [corpus.names[j] for j in trace.levels], "m": trace.cutoffs, "p_requested": p,
            "p_measured": stream.coverage, "topics": stream.topics, "queries": q,
            "coverage_per_level": [1.0] + [float(e / n) for e in encoded[1:]],
            "f_life_measured": uncascaded / spent,
            "f_life_measured_seconds": None if trace.http else n * corpus.seconds[-1] / spent_s,
            "f_life_eq1": costs.f_life(c, stream.coverage) if len(c) > 1 else corpus.gflops[-1] / c[0],
            "recall": recall(trace.rank), "cache_hit_rate": float(hit), "text_encodes_per_query": len(towers),
            "text_gflops_per_query": sum(corpus.text_gflops[t] for t in towers),
            "gflops_per_query_early": float(per_query[:tail].mean()),
            "gflops_per_query_late": float(per_query[-tail:].mean()),
            "latency_ms": {"p50": float(np.percentile(trace.ms, 50)), "p99": float(np.percentile(trace.ms, 99))},
            "errors": trace.errors, "queries_per_s": q / trace.wall_s if trace.wall_s else None}


def single_levels(corpus: Corpus, stream: Stream, k: int) -> list[dict]:
    """Each level alone over the whole corpus (the uncascaded baselines): recall on the stream and F_life vs the top."""
    out = []
    for j, name in enumerate(corpus.names):
        top = evaluate.cascade_topk([corpus.texts[j][stream.caption]], [corpus.images[j]], [], k)
        hit = top == stream.truth[:, None]
        rank = np.where(hit.any(1), hit.argmax(1), k)
        out.append({"cascade": [name], "gflops": corpus.gflops[j], "recall": recall(rank),
                    "f_life_eq1": corpus.gflops[-1] / corpus.gflops[j]})
    return out


def cascade_plans(names: Sequence[str], main: Sequence[int], cutoffs: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The requested cascade first, then every [level, top] and the whole ladder: the rows of the paper's Table 1."""
    top = len(names) - 1
    plans = [(list(main), list(cutoffs[:len(main) - 1]))]
    for levels in [[j, top] for j in range(top)] + [list(range(top + 1))]:
        if levels != plans[0][0] and len(levels) > 1:
            plans.append((levels, list(cutoffs[:len(levels) - 1])))
    return plans


def simulate(db: str, ladder: str, cfg: SimConfig = SimConfig(), world_root: str | Path | None = None,
             report_dir: str | Path | None = None, sweep: Sequence[float] = (), device: str | None = None) -> dict:
    if not 0 < cfg.p <= 1 or cfg.queries < 1 or cfg.concurrency < 1:
        raise ValueError(f"need 0 < p <= 1, queries >= 1 and concurrency >= 1 (got {cfg.p}, {cfg.queries}, "
                         f"{cfg.concurrency})")
    ladder_obj = models.get_ladder(ladder)
    if world_root is None:
        world_root = train.ensure_ladder(ladder)[1]
    names = list(ladder_obj.levels)
    main = [names.index(n) for n in cfg.cascade] if cfg.cascade else list(range(len(names)))
    if any(a >= b for a, b in zip(main, main[1:])) or len(main) < 2:
        raise ValueError(f"a cascade is 2+ levels of ladder {ladder} ({', '.join(names)}), cheapest first")
    if len(cfg.cutoffs) < len(main) - 1:
        raise ValueError(f"a {len(main)}-level cascade needs {len(main) - 1} cutoffs, got {list(cfg.cutoffs)}")
    corpus = load_corpus(db, ladder, world_root, device)
    stream = make_stream(corpus, cfg)
    log.info("stream: %d queries over %d topics; level-0 top-%d sets cover %.3f of %d images (asked %.3f)",
             cfg.queries, stream.topics, cfg.cutoffs[0], stream.coverage, corpus.n, cfg.p)
    traces = [replay_local(corpus, stream, levels, m, cfg.k) for levels, m in cascade_plans(names, main, cfg.cutoffs)]
    rows = [summarise(corpus, stream, t, cfg.p) for t in traces]
    head = rows[0]
    if cfg.url:
        traces.insert(0, replay_http(corpus, stream, cfg.url, cfg.k, cfg.concurrency))
        head = summarise(corpus, stream, traces[0], cfg.p) | {"url": cfg.url, "concurrency": cfg.concurrency}
        rows.insert(0, head)
    deep = next((t for t in traces[1 if cfg.url else 0:] if len(t.levels) >= 3), None)
    shallow = next((t for t in traces if deep and t.levels == [deep.levels[0], deep.levels[-1]]), None)
    f_lat = f_lat_eq2 = None
    if deep is not None and shallow is not None:
        f_lat = float(shallow.ms[:EARLY].mean() / deep.ms[:EARLY].mean())
        f_lat_eq2 = costs.f_latency([corpus.gflops[j] for j in deep.levels], deep.cutoffs)
    sweep_rows = []
    for p in sweep:
        s = make_stream(corpus, replace(cfg, p=p))
        sweep_rows.append(summarise(corpus, s, replay_local(corpus, s, main, cfg.cutoffs[:len(main) - 1], cfg.k), p))
    levels = single_levels(corpus, stream, cfg.k)
    doc = {"p_requested": cfg.p, "p_measured": stream.coverage, "queries": cfg.queries,
           "f_life_measured": head["f_life_measured"], "f_life_eq1": head["f_life_eq1"],
           "recall": head["recall"], "recall_top_level": levels[-1]["recall"],
           "f_latency_measured": f_lat, "f_latency_eq2": f_lat_eq2, "report": None,
           "ladder": ladder, "images": corpus.n, "topics": stream.topics, "skew": cfg.skew, "seed": cfg.seed,
           "cascades": rows, "levels": levels, "sweep": sweep_rows}
    if report_dir:
        doc["report"] = str(report.write(Path(report_dir), doc, corpus, traces))
    return doc
