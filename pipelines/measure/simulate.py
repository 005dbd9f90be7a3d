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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from bicascade import costs, models
from bicascade.cascade import Cascade, DictCache, ExactIndex, Level, default_cutoffs, f_latency, f_life, validate
from bicascade.errors import BadInputError
from bicascade.levels import ResolvedLadder
from bicascade.pipelines.measure import evaluate, report
from bicascade.query import encode_stored
from bicascade.storage import tables

log = logging.getLogger("bicascade")
EARLY = 20  # queries that count as "early" (cold cache) for Eq. 2


@dataclass(frozen=True)
class SimConfig:
    p: float = 0.1
    queries: int = 10_000
    skew: float = 1.0  # Zipf exponent of topic popularity
    cutoffs: tuple[int, ...] | None = None  # default: the paper's for the ladder's depth
    cascade: tuple[str, ...] | None = None  # model names, cheapest first; default the whole ladder
    k: int = 10
    seed: int = 0
    topic_size: int = 10  # images per topic (k-means clusters of level-0 vectors)
    url: str | None = None  # replay against this server instead of in process
    concurrency: int = 8


@dataclass
class Replayed:
    """A held-out corpus with everything the replays share: ids as indexed, queries, embeddings."""

    ids: list[str]
    captions: list[str]  # the held-out queries
    relevant: np.ndarray  # (queries, R) every relevant image index, -1 padded
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

    @property
    def caption_image(self) -> np.ndarray:
        """Each query's first relevant image: its topic in a stream."""
        return self.relevant[:, 0]


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


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 20, chunk: int = 4096) -> np.ndarray:
    """Cluster labels of unit vectors (spherical k-means; k-means++-free seeding from a seeded sample). Memory is
    O(chunk x k), not O(n x k): with a topic per 10 images, n x k scores were 4 GB at 100,000 images."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), k, replace=False)]

    def assign() -> np.ndarray:
        return np.concatenate([np.argmax(x[i:i + chunk] @ centres.T, axis=1) for i in range(0, len(x), chunk)])

    for _ in range(iters):
        labels = assign()
        order = np.argsort(labels, kind="stable")  # each cluster's members in corpus order, found in O(n log n)
        starts = np.searchsorted(labels[order], np.arange(k + 1))
        for c in np.flatnonzero(np.diff(starts)):
            v = x[order[starts[c]:starts[c + 1]]].sum(0)
            centres[c] = v / max(np.linalg.norm(v), 1e-12)
    return assign()


def top_sets(text: np.ndarray, img: np.ndarray, m: int, chunk: int = 2048) -> np.ndarray:
    """(queries, m) image indices of each text's level-0 top-m set (exact). Each chunk's top m is copied out: a
    slice would keep its whole (chunk, N) int64 argpartition alive, 1.6 GB a chunk at 100,000 images. A corpus
    smaller than m is all of every top set."""
    m = min(m, len(img))
    out = [np.argpartition(-(text[i:i + chunk] @ img.T), m - 1, axis=1)[:, :m].copy()
           for i in range(0, len(text), chunk)]
    return np.concatenate(out)


def make_stream(corpus: Replayed, cfg: SimConfig) -> Stream:
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


def load_corpus(db_uri: str, ladder: ResolvedLadder, held: evaluate.HeldOut, device: str | None = None) -> Replayed:
    """The held-out corpus as indexed, every level's image and query embeddings, and each level's measured seconds
    per image."""
    db = tables.Database(db_uri)
    infos = ladder.levels
    level0 = evaluate.indexed_vectors(db_uri, infos[0].fingerprint, held)
    loaded, embedded, texts, seconds = [], [], [], []
    for j, info in enumerate(infos):
        model = models.load_model(info.spec, device=device)
        timed = None if j else 2000  # level 0 is the index's: embedded here only to time it
        t0 = time.perf_counter()
        vectors = evaluate.embed_corpus(model, held, db_uri, timed)
        seconds.append((time.perf_counter() - t0) / len(vectors))
        embedded.append(vectors)
        texts.append(texts[info.text] if info.text < j else evaluate.embed_texts(model, held.queries))
        loaded.append(model)
    return Replayed(held.ids, held.queries, held.relevant, [i.name for i in infos],
                  [i.gflops for i in infos], seconds, [level0] + embedded[1:], texts, [i.text for i in infos],
                  [costs.text_gflops(i.spec) for i in infos], loaded, db)


def replay_local(corpus: Replayed, stream: Stream, levels: Sequence[int], cutoffs: Sequence[int], k: int) -> Trace:
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
        out = cascade.search(corpus.captions[c], k=k, vectors=[corpus.texts[j][c] for j in levels])
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


def replay_http(corpus: Replayed, stream: Stream, url: str, k: int, concurrency: int) -> Trace:
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


def recall_of_ranks(rank: np.ndarray) -> dict[str, float]:
    return {str(k): float((rank < k).mean()) for k in evaluate.KS}


def recall_ci(rank: np.ndarray, truth: np.ndarray, seed: int = 0, resamples: int = 1000) -> dict[str, list[float]]:
    """95% intervals of each Recall@k by a cluster bootstrap over the distinct target images: queries about one image
    are not independent samples, so the images, not the queries, are resampled."""
    targets, inverse = np.unique(truth, return_inverse=True)
    hits = {k: np.bincount(inverse, weights=rank < k, minlength=len(targets)) for k in evaluate.KS}
    counts = np.bincount(inverse, minlength=len(targets))
    pick = np.random.default_rng(seed).integers(len(targets), size=(resamples, len(targets)))
    out = {}
    for k in evaluate.KS:
        boot = hits[k][pick].sum(1) / np.maximum(1, counts[pick].sum(1))
        out[str(k)] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


@dataclass
class CascadeRun:
    """One replay of the stream through one cascade (or a single level over the whole corpus)."""

    cascade: list[str]
    m: list[int]
    recall: dict[str, float]  # Recall@1/5/10 of the stream's queries
    recall_ci: dict[str, list[float]]  # 95% cluster-bootstrap interval of each
    f_life_eq1: float
    gflops: float | None = None  # single levels: image GFLOPs per image
    p_requested: float | None = None
    p_measured: float | None = None
    topics: int | None = None
    queries: int | None = None
    coverage_per_level: list[float] | None = None  # fraction of the corpus each level encoded (level 0: all)
    f_life_measured: float | None = None  # FLOPs: uncascaded top level over index + cache misses
    f_life_measured_seconds: float | None = None  # the same in measured encoder seconds (in process only)
    cache_hit_rate: float | None = None
    text_encodes_per_query: int | None = None
    text_gflops_per_query: float | None = None
    gflops_per_query_early: float | None = None  # image GFLOPs per query, first 10% of the stream
    gflops_per_query_late: float | None = None  # ... last 10%
    latency_ms: dict[str, float] | None = None
    errors: int = 0
    queries_per_s: float | None = None
    url: str | None = None  # replayed over HTTP against this server
    concurrency: int | None = None


def summarise(corpus: Replayed, stream: Stream, trace: Trace, p: float, seed: int = 0) -> CascadeRun:
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
    return CascadeRun(
        cascade=[corpus.names[j] for j in trace.levels], m=trace.cutoffs, recall=recall_of_ranks(trace.rank),
        recall_ci=recall_ci(trace.rank, stream.truth, seed),
        f_life_eq1=f_life(c, stream.coverage) if len(c) > 1 else corpus.gflops[-1] / c[0],
        p_requested=p, p_measured=stream.coverage, topics=stream.topics, queries=q,
        coverage_per_level=[1.0] + [float(e / n) for e in encoded[1:]], f_life_measured=uncascaded / spent,
        f_life_measured_seconds=None if trace.http else n * corpus.seconds[-1] / spent_s, cache_hit_rate=float(hit),
        text_encodes_per_query=len(towers), text_gflops_per_query=sum(corpus.text_gflops[t] for t in towers),
        gflops_per_query_early=float(per_query[:tail].mean()), gflops_per_query_late=float(per_query[-tail:].mean()),
        latency_ms={"p50": float(np.percentile(trace.ms, 50)), "p99": float(np.percentile(trace.ms, 99))},
        errors=trace.errors, queries_per_s=q / trace.wall_s if trace.wall_s else None)


def single_levels(corpus: Replayed, stream: Stream, k: int, seed: int = 0) -> list[CascadeRun]:
    """Each level alone over the whole corpus (the uncascaded baselines): recall on the stream and F_life vs the top."""
    out = []
    for j, name in enumerate(corpus.names):
        top = evaluate.cascade_topk([corpus.texts[j][stream.caption]], [corpus.images[j]], [], k)
        hit = top == stream.truth[:, None]
        rank = np.where(hit.any(1), hit.argmax(1), k)
        out.append(CascadeRun(cascade=[name], m=[], recall=recall_of_ranks(rank),
                              recall_ci=recall_ci(rank, stream.truth, seed),
                              f_life_eq1=corpus.gflops[-1] / corpus.gflops[j], gflops=corpus.gflops[j]))
    return out


def replays(names: Sequence[str], main: Sequence[int], cutoffs: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The requested cascade first, then every [level, top] and the whole ladder: the rows of the paper's Table 1."""
    top = len(names) - 1
    out = [(list(main), list(cutoffs[:len(main) - 1]))]
    for levels in [[j, top] for j in range(top)] + [list(range(top + 1))]:
        if levels != out[0][0] and len(levels) > 1:
            out.append((levels, list(cutoffs[:len(levels) - 1])))
    return out


@dataclass
class SimReport:
    """The `bicascade simulate` document. The headline figures are the requested cascade's (over HTTP when a URL
    was given); `cascades` holds every replay, `levels` every level alone, `sweep` the cascade at other p."""

    ladder: str
    images: int
    queries: int
    distinct_targets: int  # images the stream asks about: the sample size behind every recall
    topics: int
    skew: float
    seed: int
    p_requested: float
    p_measured: float
    f_life_measured: float
    f_life_eq1: float
    recall: dict[str, float]
    recall_ci: dict[str, list[float]]
    recall_top_level: dict[str, float]
    f_latency_measured: float | None
    f_latency_eq2: float | None
    cascades: list[CascadeRun]
    levels: list[CascadeRun]
    sweep: list[CascadeRun]
    report: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return report.summary(self.to_json()) + (f"\nreport: {self.report}" if self.report else "")


def simulate(db: str, ladder: ResolvedLadder, world_root: str | Path, cfg: SimConfig = SimConfig(),
             report_dir: str | Path | None = None, sweep: Sequence[float] = (), device: str | None = None) -> SimReport:
    """`bicascade simulate`: the world's test split as indexed in `db`, replayed as a p-small-world stream."""
    check(ladder, cfg)
    return run_stream(load_corpus(db, ladder, evaluate.world_heldout(world_root), device), ladder, cfg, report_dir,
                      sweep)


def check(ladder: ResolvedLadder, cfg: SimConfig) -> SimConfig:
    if not 0 < cfg.p <= 1 or cfg.queries < 1 or cfg.concurrency < 1:
        raise BadInputError(f"need 0 < p <= 1, queries >= 1 and concurrency >= 1 (got {cfg.p}, {cfg.queries}, "
                            f"{cfg.concurrency})")
    names = ladder.names
    if cfg.cutoffs is None:
        cfg = replace(cfg, cutoffs=default_cutoffs(len(names)))
    unknown = [n for n in cfg.cascade or () if n not in names]
    if unknown:
        raise BadInputError(f"{', '.join(unknown)}: not a level of ladder {ladder.name} ({', '.join(names)})")
    main = [names.index(n) for n in cfg.cascade] if cfg.cascade else list(range(len(names)))
    if any(a >= b for a, b in zip(main, main[1:])) or len(main) < 2:
        raise BadInputError(f"a cascade is 2+ levels of ladder {ladder.name} ({', '.join(names)}), cheapest first")
    validate(len(main), list(cfg.cutoffs[:len(main) - 1]), cfg.k)
    return cfg


def run_stream(corpus: Replayed, ladder: ResolvedLadder, cfg: SimConfig, report_dir: str | Path | None = None,
               sweep: Sequence[float] = ()) -> SimReport:
    """The stream over a loaded corpus, through every cascade of Table 1 (and the server, with a URL)."""
    cfg = check(ladder, cfg)
    names = ladder.names
    main = [names.index(n) for n in cfg.cascade] if cfg.cascade else list(range(len(names)))
    stream = make_stream(corpus, cfg)
    log.info("stream: %d queries over %d topics (%d distinct images); level-0 top-%d sets cover %.3f of %d images "
             "(asked %.3f)", cfg.queries, stream.topics, len(np.unique(stream.truth)), cfg.cutoffs[0], stream.coverage,
             corpus.n, cfg.p)
    traces = [replay_local(corpus, stream, levels, m, cfg.k) for levels, m in replays(names, main, cfg.cutoffs)]
    rows = [summarise(corpus, stream, t, cfg.p, cfg.seed) for t in traces]
    head = rows[0]
    if cfg.url:
        traces.insert(0, replay_http(corpus, stream, cfg.url, cfg.k, cfg.concurrency))
        head = replace(summarise(corpus, stream, traces[0], cfg.p, cfg.seed), url=cfg.url, concurrency=cfg.concurrency)
        rows.insert(0, head)
    deep = next((t for t in traces[1 if cfg.url else 0:] if len(t.levels) >= 3), None)
    shallow = next((t for t in traces if deep and t.levels == [deep.levels[0], deep.levels[-1]]), None)
    f_lat = f_lat_eq2 = None
    if deep is not None and shallow is not None:
        f_lat = float(shallow.ms[:EARLY].mean() / deep.ms[:EARLY].mean())
        f_lat_eq2 = f_latency([corpus.gflops[j] for j in deep.levels], deep.cutoffs)
    sweep_rows = []
    for p in sweep:
        st = make_stream(corpus, replace(cfg, p=p))
        sweep_rows.append(summarise(corpus, st, replay_local(corpus, st, main, cfg.cutoffs[:len(main) - 1], cfg.k), p,
                                    cfg.seed))
    levels = single_levels(corpus, stream, cfg.k, cfg.seed)
    out = SimReport(ladder=ladder.name, images=corpus.n, queries=cfg.queries,
                    distinct_targets=int(len(np.unique(stream.truth))), topics=stream.topics, skew=cfg.skew,
                    seed=cfg.seed, p_requested=cfg.p, p_measured=stream.coverage,
                    f_life_measured=head.f_life_measured, f_life_eq1=head.f_life_eq1, recall=head.recall,
                    recall_ci=head.recall_ci, recall_top_level=levels[-1].recall, f_latency_measured=f_lat,
                    f_latency_eq2=f_lat_eq2, cascades=rows, levels=levels, sweep=sweep_rows)
    if report_dir:
        out.report = str(report.write(Path(report_dir), out.to_json(), corpus, traces))
    return out
