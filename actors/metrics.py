"""Prometheus metrics aggregated across every ingress and router replica: each replica counts locally and sends
its deltas every second to one named hub actor, which renders the text format for GET /metrics."""
from __future__ import annotations

import threading
from collections import defaultdict

import ray

# (name, kind, help, label names); histograms share the buckets below
SERIES = [
    ("bicascade_level_candidates_total", "counter", "Candidates ranked by a cascade level", ("level", "model")),
    ("bicascade_level_cache_hits_total", "counter", "Candidates whose embedding came from the level's cache",
     ("level", "model")),
    ("bicascade_level_images_encoded_total", "counter", "Images a level's image encoder embedded (cache misses)",
     ("level", "model")),
    ("bicascade_level_encoder_gflops_total", "counter", "Image-encoder GFLOPs spent by a level", ("level", "model")),
    ("bicascade_level_encode_seconds", "histogram", "Time a level spent on a query that encoded images",
     ("level", "model")),
    ("bicascade_query_seconds", "histogram", "Search latency inside the router, by cascade depth", ("depth",)),
    ("bicascade_responses_total", "counter", "HTTP responses by route and status class", ("route", "status")),
    ("bicascade_text_cache_hits_total", "counter", "Query text embeddings served from the router's cache", ()),
    ("bicascade_text_encodes_total", "counter", "Query text embeddings computed by an encoder", ()),
    ("bicascade_cache_rows", "gauge", "Rows of a level's embedding table (level 0: the corpus)", ("level", "model")),
    ("bicascade_audit_queries_total", "counter", "Queries the recall audit ranked deeper", ()),
    ("bicascade_audit_recall_kept_total", "counter",
     "Sum over audited queries of the share of the deeper top k the served results kept (/ queries: the recall kept)",
     ()),
    ("bicascade_audit_images_encoded_total", "counter", "Images the audit's top level embedded (not cached)", ()),
    ("bicascade_audit_encoder_gflops_total", "counter", "Image-encoder GFLOPs the audit spent", ()),
    ("bicascade_live_coverage", "gauge", "Fraction of the corpus a level's cache holds: the live p", ("level",)),
]
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Recorder:
    """A replica's local counts; `flush` hands the deltas to the hub (called from a background thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[tuple, float] = defaultdict(float)
        self.observations: dict[tuple, list[float]] = defaultdict(list)
        self.gauges: dict[tuple, float] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self.lock:
            self.counts[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        with self.lock:
            self.observations[(name, tuple(sorted(labels.items())))].append(seconds)

    def set(self, name: str, value: float, **labels: str) -> None:
        with self.lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    def take(self) -> tuple[dict, dict, dict]:
        with self.lock:
            out = dict(self.counts), {k: list(v) for k, v in self.observations.items()}, dict(self.gauges)
            self.counts.clear()
            self.observations.clear()
            self.gauges.clear()
        return out


@ray.remote(num_cpus=0)
class MetricsHub:
    """The cluster's one aggregate of every replica's metrics (a named, detached actor)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: timestamps of first use say nothing here
        self.registry = CollectorRegistry()
        make = {"counter": Counter, "gauge": Gauge,
                "histogram": lambda n, h, labels, registry: Histogram(n, h, labels, registry=registry, buckets=BUCKETS)}
        self.series = {}
        self.sums: dict[str, float] = defaultdict(float)  # every counter summed over its labels, for /stats
        for name, kind, about, labels in SERIES:
            metric = make[kind](name.removesuffix("_total") if kind == "counter" else name, about, labels,
                                registry=self.registry)
            self.series[name] = metric

    def add(self, counts: dict, observations: dict, gauges: dict) -> None:
        for (name, labels), value in counts.items():
            self._child(name, labels).inc(value)
            self.sums[name] += value
        for (name, labels), values in observations.items():
            child = self._child(name, labels)
            for v in values:
                child.observe(v)
        for (name, labels), value in gauges.items():
            self._child(name, labels).set(value)

    def _child(self, name: str, labels: tuple):
        metric = self.series[name]
        return metric.labels(**dict(labels)) if labels else metric

    def totals(self) -> dict[str, float]:
        return dict(self.sums)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def hub(app: str) -> ray.actor.ActorHandle:
    """The hub of one Serve app: two apps on one cluster never mix their counts."""
    return MetricsHub.options(name=f"bicascade-metrics-{app}", namespace="bicascade", get_if_exists=True,
                              lifetime="detached", max_restarts=-1, max_task_retries=-1).remote()


def push(recorder: Recorder, target: ray.actor.ActorHandle) -> ray.ObjectRef | None:
    """Hand `recorder`'s deltas to the hub now; the call's ref (None when nothing was pending)."""
    counts, observations, gauges = recorder.take()
    return target.add.remote(counts, observations, gauges) if counts or observations or gauges else None


def start_flusher(recorder: Recorder, target: ray.actor.ActorHandle, every_s: float = 1.0) -> threading.Event:
    """Send `recorder`'s deltas to the hub every `every_s` (fire and forget); set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            push(recorder, target)
    threading.Thread(target=loop, daemon=True, name="bicascade-metrics").start()
    return stop
