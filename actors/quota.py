"""Per-client rate limits shared by every ingress replica: one named actor holds a token bucket per client, and each
replica leases tokens from it in small batches, so the limit is the cluster's, not one replica's."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class RateLimit:
    rate: float = 200.0  # requests per second per client (per API key, or per client address without keys)
    burst: float = 400.0  # bucket size
    lease: int = 10  # tokens a replica takes from the shared bucket at a time

    @property
    def enabled(self) -> bool:
        return self.rate > 0


class Bucket:
    """A token bucket: `rate` tokens a second up to `burst`."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, want: float, now: float) -> tuple[float, float]:
        """(tokens granted, seconds until one more would be)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        granted = min(want, max(0.0, self.tokens))
        self.tokens -= granted
        return granted, 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


@ray.remote(num_cpus=0)
class Quota:
    """The cluster's buckets (a named, detached actor)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, Bucket] = {}

    def lease(self, client: str, want: int) -> tuple[float, float]:
        now = time.monotonic()
        if len(self.buckets) > 100_000:  # forget idle clients rather than grow without bound
            self.buckets = {c: b for c, b in self.buckets.items() if now - b.at < 60}
        bucket = self.buckets.setdefault(client, Bucket(self.rate, self.burst, now))
        return bucket.take(want, now)


class Limiter:
    """An ingress replica's side: local leases per client, refilled from the shared Quota actor."""

    def __init__(self, limit: RateLimit, app: str) -> None:
        self.limit = limit
        self.quota = Quota.options(name=f"bicascade-quota-{app}", namespace="bicascade", get_if_exists=True,
                                   lifetime="detached", max_restarts=-1, max_task_retries=-1
                                   ).remote(limit.rate, limit.burst) if limit.enabled else None
        self.local: dict[str, float] = {}
        self.lock = threading.Lock()

    async def admit(self, client: str) -> float | None:
        """None if the request may go on, else the seconds to wait before retrying."""
        if self.quota is None:
            return None
        with self.lock:
            if self.local.get(client, 0) >= 1:
                self.local[client] -= 1
                return None
        granted, retry = await self.quota.lease.remote(client, self.limit.lease)
        with self.lock:
            have = self.local.get(client, 0) + granted
            if have >= 1:
                self.local[client] = have - 1
                return None
            self.local[client] = have
        return max(retry, 0.01)
