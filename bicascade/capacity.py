"""Capacity on paper: what indexing and serving N images with a ladder costs. GPU-hours and price to index level 0,
storage per table, level 0's ANN memory and shards, nodes for a query rate, and the level caches' growth over a year
of a p-small-world stream. Every figure is a model over three kinds of input: FLOPs counted on the real
architectures (bicascade.costs), points this project measured (`Calibration`: each says where), and assumptions a
caller overrides (`Assumptions`: prices, utilisation, node sizes). docs/SCALE.md derives each formula and checks it
against the measured runs."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from bicascade import costs, models, registry
from bicascade.cascade import DEFAULT_CUTOFFS
from bicascade.errors import BadInputError

YEAR_S = 365 * 86400
AFTER = {"1 hour": 3600, "1 day": 86400, "1 week": 7 * 86400, "1 month": YEAR_S / 12, "1 year": YEAR_S}


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense peak, from the vendor's data sheet
    usd_per_hour: float  # an assumed on-demand price: pass your own


GPUS = {"h100": Gpu("NVIDIA H100 SXM", 989.0, 4.0), "h200": Gpu("NVIDIA H200", 989.0, 5.0),
        "a100": Gpu("NVIDIA A100 80GB", 312.0, 2.5), "l4": Gpu("NVIDIA L4", 121.0, 0.8)}


@dataclass(frozen=True)
class Calibration:
    """Measured by this project on its 2-core CPU machine (one core per figure unless said)."""

    # bench/results/ann_clip_1m_cpu.json: 1M CLIP-shaped 512-d vectors, IVF_SQ with 3,000 partitions built in 85.2 s,
    # recall@50 0.955 at p50 13.96 ms probing 428 (the shipped plan, tables.ann_params)
    ann_rows: int = 1_000_000
    ann_build_s: float = 85.2
    ann_query_ms: float = 13.96
    # a 12 MP phone JPEG: decode (draft) 40-45 ms + its 1024-px stored copy 56 ms, 154 KB; a 0.3 MP web JPEG: 2.2 ms
    # for both, stored as it came, 55 KB (images.decode / images.stored_bytes on bench/photos.py's corpora)
    decode_ms: dict[str, float] = field(default_factory=lambda: {"phone": 100.0, "web": 2.2})
    stored_kb: dict[str, float] = field(default_factory=lambda: {"phone": 154.0, "web": 55.0})
    # the index job's CPU time per image besides decoding, at most: 16 cores kept 2,699.8 small synthetic JPEGs/s
    # flowing to an H200 (ViT-B-16, after start-up; bench/results/build_gpu_h200.json)
    pipeline_ms: float = 16 * 1000 / 2699.8


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.35  # share of the GPU's bf16 peak an image or text tower achieves at large batches
    cpus_per_gpu: int = 16  # decode cores beside each GPU when indexing
    node_memory_gb: float = 128.0  # a level-0 search node
    ann_memory_share: float = 0.5  # of it for the resident index (the rest: OS, page cache, the process)
    shard_ms: float = 30.0  # the most a query may spend in one shard (shards are searched in parallel)
    node_cores: int = 16
    build_exponent: float = 1.5  # ANN build time ~ rows x partitions, partitions ~ sqrt(rows) (tables.ann_params)


@dataclass
class CapacityReport:
    images: int
    ladder: str
    gpu: str
    qps: float
    p: float
    cutoffs: list[int]
    corpus: str
    levels: list[dict]
    index: dict
    storage_gb: dict
    ann: dict
    serving: dict
    cache_growth: dict[str, dict]
    assumptions: dict
    calibration: dict

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        ix, an, sv = self.index, self.ann, self.serving
        lines = [f"{self.images:,} {self.corpus} images, ladder {self.ladder} "
                 f"({' -> '.join(lv['model'] for lv in self.levels)}), {self.qps:g} queries/s, p = {self.p}, "
                 f"m = {self.cutoffs}, {self.gpu}",
                 f"index level 0: {ix['gpu_hours']:,.2f} GPU-hours of encoding and {ix['cpu_core_hours']:,.0f} "
                 f"core-hours of decoding: {ix['node_hours']:,.1f} h of a GPU with "
                 f"{self.assumptions['cpus_per_gpu']} cores ({ix['bound']}-bound), ${ix['usd']:,.0f}",
                 "storage: " + ", ".join(f"{name} {gb:,.1f} GB" for name, gb in self.storage_gb.items()),
                 f"level-0 ANN: {an['resident_gb']:,.1f} GB resident, {an['shards']} shard(s) of "
                 f"{an['rows_per_shard']:,} rows, built in {an['build_hours_per_shard']:,.2f} h each on 2 cores "
                 f"(extrapolated), {an['query_ms_per_shard']:,.1f} ms per query per shard",
                 f"serving {self.qps:g} q/s: {sv['search_nodes']} search node(s) of {self.assumptions['node_cores']} "
                 f"cores; GPUs for encoding {sv['gpus_cold']:.2f} on day one (every candidate a miss), "
                 f"{sv['gpus_after_a_month']:.2f} after a month",
                 "cache rows (GB) per upper level after " + ", ".join(
                     f"{when}: " + " / ".join(f"{r:,} ({gb:,.1f})" for r, gb in zip(g["rows"], g["gb"]))
                     for when, g in self.cache_growth.items())]
        return "\n".join(lines)


def cached_rows(reach: float, queries: float, m: int) -> int:
    """A level's cache after `queries` queries whose top `m` each fall anywhere in the `reach` = p x N images the
    stream ever touches: the distinct ones of queries x m draws from it (at most `reach`, Eq. 1's premise)."""
    return int(reach * -math.expm1(-queries * m / reach))


def plan(images: int, ladder: str, gpu: str = "h100", qps: float = 100.0, p: float = 0.1,
         cutoffs: Sequence[int] = DEFAULT_CUTOFFS, corpus: str = "phone", usd_per_gpu_hour: float | None = None,
         assumptions: Assumptions = Assumptions(), calibration: Calibration = Calibration()) -> CapacityReport:
    if images < 1 or qps < 0 or not 0 < p <= 1:
        raise BadInputError("need --images >= 1, --qps >= 0 and 0 < --p <= 1")
    if gpu not in GPUS:
        raise BadInputError(f"unknown --gpu {gpu!r} (known: {', '.join(GPUS)})")
    if corpus not in calibration.decode_ms:
        raise BadInputError(f"unknown --corpus {corpus!r} (known: {', '.join(calibration.decode_ms)})")
    chosen = registry.get_ladder(ladder)
    specs = [registry.get_model(n) for n in chosen.levels]
    cutoffs = list(cutoffs)[:len(specs) - 1]
    if len(cutoffs) < len(specs) - 1:
        raise BadInputError(f"a {len(specs)}-level ladder needs {len(specs) - 1} cutoffs, got {cutoffs}")
    card = GPUS[gpu]
    price = card.usd_per_hour if usd_per_gpu_hour is None else usd_per_gpu_hour
    flops_s = card.bf16_tflops * 1e3 * assumptions.mfu  # GFLOP/s one GPU achieves
    dims = [int(models.model_config(s.arch)["embed_dim"]) for s in specs]
    image = [costs.image_gflops(s) for s in specs]
    levels = [{"model": s.name, "image_gflops": round(g, 3), "dim": d} for s, g, d in zip(specs, image, dims)]

    # indexing: level 0 over every image; the GPU and the decoding cores beside it work at once
    gpu_s = images * image[0] / flops_s
    cpu_s = images * (calibration.decode_ms[corpus] + calibration.pipeline_ms) / 1e3
    node_s = max(gpu_s, cpu_s / assumptions.cpus_per_gpu)  # the GPU's node is rented for whichever takes longer
    index = {"pflops": round(images * image[0] / 1e6, 2), "gpu_hours": round(gpu_s / 3600, 2),
             "cpu_core_hours": round(cpu_s / 3600, 1), "node_hours": round(node_s / 3600, 2),
             "usd": round(node_s / 3600 * price, 2),
             "bound": "GPU" if gpu_s >= cpu_s / assumptions.cpus_per_gpu else "decode"}

    # storage: the stored copies, level 0's vectors (float32 + id) and its IVF_SQ (one byte per dim + a row id),
    # and each upper level's cache at its lifetime bound, p x N rows (Eq. 1's premise)
    row_id = 8 + 16  # a row id and the 16-hex content id
    ann_row = dims[0] + 8
    storage = {"images": images * (calibration.stored_kb[corpus] * 1024 + 512) / 1e9,
               "level0_vectors": images * (dims[0] * 4 + row_id) / 1e9, "level0_ann": images * ann_row / 1e9}
    storage |= {f"cache_{s.name}": p * images * (d * 4 + row_id) / 1e9 for s, d in zip(specs[1:], dims[1:])}

    # level 0's ANN: shards that fit a node's memory share and answer within shard_ms; build and query time scale
    # from the 1M calibration (the shipped plan probes a fixed share of the partitions: a query's work ~ rows)
    resident = images * ann_row / 1e9
    by_memory = resident / (assumptions.node_memory_gb * assumptions.ann_memory_share)
    by_latency = images / calibration.ann_rows * calibration.ann_query_ms / assumptions.shard_ms
    shards = max(1, math.ceil(max(by_memory, by_latency)))
    per_shard = math.ceil(images / shards)
    scale = per_shard / calibration.ann_rows
    ann = {"resident_gb": round(resident, 2), "shards": shards, "rows_per_shard": per_shard,
           "shards_for_memory": math.ceil(by_memory), "shards_for_latency": math.ceil(by_latency),
           "build_hours_per_shard": round(calibration.ann_build_s * scale ** assumptions.build_exponent / 3600, 3),
           "query_ms_per_shard": round(calibration.ann_query_ms * scale, 2)}

    # serving: every query searches every shard (a core each) and embeds its text once per distinct tower; upper
    # levels embed their candidates not yet cached: all on day one, then the share of the p x N set still uncached
    # after q queries, exp(-q m_j / pN) when each query's top m_j fall anywhere in that set (an upper bound on misses)
    reach = p * images
    core_s = shards * ann["query_ms_per_shard"] / 1e3
    text = costs.text_gflops(specs[0]) if chosen.shared_text_tower else sum(costs.text_gflops(s) for s in specs)

    def encode_gflops_per_query(queries: float) -> float:  # the misses: the share of the reach not yet cached
        return text + sum(m * c * (1 - cached_rows(reach, queries, m) / reach) for m, c in zip(cutoffs, image[1:]))
    month = qps * YEAR_S / 12
    serving = {"core_seconds_per_query": round(core_s, 4),
               "search_nodes": max(1, math.ceil(qps * core_s / assumptions.node_cores)),
               "text_gflops_per_query": round(text, 3),
               "gpus_cold": round(qps * encode_gflops_per_query(0) / flops_s, 3),
               "gpus_after_a_month": round(qps * encode_gflops_per_query(month) / flops_s, 3)}
    growth = {}
    for when, seconds in AFTER.items():
        rows = [cached_rows(reach, qps * seconds, m) for m in cutoffs]
        growth[when] = {"rows": rows, "gb": [round(r * (d * 4 + row_id) / 1e9, 2) for r, d in zip(rows, dims[1:])],
                        "encode_gpu_hours": round(sum(r * c for r, c in zip(rows, image[1:])) / flops_s / 3600, 2)}
    return CapacityReport(images, ladder, card.name, qps, p, cutoffs, corpus, levels, index,
                          {k: round(v, 2) for k, v in storage.items()}, ann, serving, growth,
                          asdict(assumptions) | {"usd_per_gpu_hour": price}, asdict(calibration))
