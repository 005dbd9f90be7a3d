"""How long `bicascade serve` takes to become useful, broken down: Ray up, Serve's controller and proxy, each
deployment healthy, the first search answered. Prints JSON. Not a test.

    python bench/startup.py [--db work/db] [--runs 2] [--out bench/results/startup_cpu.json]

Each run starts a fresh local cluster (as `bicascade serve` does) and stops it afterwards.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import requests
from common import emit

from bicascade.pipelines.runtime import free_port


def watch(app: str, t0: float, out: dict[str, float], done: threading.Event) -> None:
    """Seconds after t0 at which each deployment of `app` first reported HEALTHY."""
    from ray import serve

    while not done.wait(0.2):
        try:
            status = serve.status().applications.get(app)
        except Exception:  # the controller is still starting
            continue
        for name, d in (status.deployments if status else {}).items():
            if d.status == "HEALTHY" and name not in out:
                out[name] = round(time.monotonic() - t0, 2)


def one_run(db: str) -> dict:
    from ray import serve

    from bicascade.pipelines import runtime
    from bicascade.serve import server
    from bicascade.serve.app import AppConfig
    from bicascade.serve.build import build
    from bicascade.serve.config import runtime_env

    t0 = time.monotonic()
    runtime.connect(runtime_env())
    ray_up = time.monotonic() - t0
    port = free_port()
    t1 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    controller = time.monotonic() - t1
    healthy: dict[str, float] = {}
    done = threading.Event()
    t2 = time.monotonic()
    threading.Thread(target=watch, args=("bicascade", t2, healthy, done), daemon=True).start()
    app = build(AppConfig(db=db, rate=0))
    built = time.monotonic() - t2
    serve.run(app, name="bicascade", route_prefix="/")
    deployed = time.monotonic() - t2
    done.set()
    t3 = time.monotonic()
    r = requests.post(f"http://127.0.0.1:{port}/search", json={"query": "a red circle", "k": 10}, timeout=120)
    r.raise_for_status()
    first = time.monotonic() - t3
    server.stop()
    return {"ray_up_s": round(ray_up, 2), "serve_controller_s": round(controller, 2),
            "app_build_s": round(built, 2), "deployments_healthy_s": dict(sorted(healthy.items(), key=lambda x: x[1])),
            "deploy_s": round(deployed, 2), "first_search_s": round(first, 2),
            "healthy_after_ray_s": round(controller + deployed, 2),
            "total_s": round(ray_up + controller + deployed + first, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default="work/db", help="an indexed database (`make demo` makes work/db)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args()
    from bicascade.storage import tables
    if not tables.Database(a.db).recorded_ladder():
        sys.exit(f"{a.db} is not an indexed database: run `make demo` first, or pass --db")
    runs = [one_run(a.db) for _ in range(a.runs)]
    best = min(runs, key=lambda r: r["healthy_after_ray_s"])
    emit({"db": a.db, "runs": runs, "healthy_after_ray_s_best": best["healthy_after_ray_s"]}, a.out)


if __name__ == "__main__":
    main()
