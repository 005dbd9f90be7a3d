"""What every benchmark here shares: a free loopback port, the server through each ingress, closed-loop HTTP
clients of `/search`, percentiles, and the one JSON document it prints (and writes)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import requests

from bicascade.pipelines.runtime import free_port


def each_ingress(db: str) -> Iterator[tuple[str, str]]:
    """(ingress, url): `bicascade serve` on `db` (no rate limit) through Serve's proxy, then with direct ingress
    (`serve --direct`), each stopped before the next starts. Proxy first: direct ingress stays on in this process's
    later clusters."""
    from bicascade.serve import server
    from bicascade.serve.app import AppConfig

    for ingress in ("proxy", "direct"):
        url = server.start(AppConfig(db=db, rate=0), port=free_port(), direct=ingress == "direct")
        try:
            yield ingress, url
        finally:
            server.stop()


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def pct(xs: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(xs, 50)), 2), "p99_ms": round(float(np.percentile(xs, 99)), 2)}


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def search(self, body: dict) -> tuple[float, dict, float]:
        t0 = time.perf_counter()
        r = self.session.post(f"{self.url}/search", json=body, timeout=120)
        ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        return ms, r.json(), float(r.headers.get("x-ingress-ms", "nan"))


def load_test(url: str, queries: list[str], clients: int, seconds: float, depth: int | None) -> dict:
    """`clients` closed-loop clients for `seconds`: searches/s and latency."""
    end = time.monotonic() + seconds

    def worker(i: int) -> tuple[list[float], int]:
        c, lat, bad, n = Client(url), [], 0, i
        while time.monotonic() < end:
            try:
                lat.append(c.search({"query": queries[n % len(queries)], "k": 10, "depth": depth})[0])
            except requests.RequestException:
                bad += 1
            n += 1
        return lat, bad
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(worker, range(clients)))
    wall = time.monotonic() - t0
    lat = [x for d in done for x in d[0]]
    return {"clients": clients, "depth": depth or "all", "searches_per_s": round(len(lat) / wall, 1),
            "errors": sum(d[1] for d in done), **pct(lat)}
