"""`bicascade serve`: start the app on a local (or RAY_ADDRESS) Ray cluster, serve until Ctrl-C or SIGTERM, then
flush the cache writers and shut everything down."""
from __future__ import annotations

import logging
import os
import signal
import threading

import ray
from ray import serve

from bicascade.pipelines.ingest import cluster
from bicascade.serve.app import AppConfig, Keys
from bicascade.serve.build import build, runtime_env

log = logging.getLogger("bicascade")


def deploy(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "bicascade",
           route_prefix: str = "/") -> str:
    """Deploy the app and return its URL once every deployment is healthy."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(config), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def start(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "bicascade",
          route_prefix: str = "/") -> str:
    cluster.connect(runtime_env())
    return deploy(config, host, port, name, route_prefix)


def stop(flush: bool = True) -> None:
    """Flush pending cache writes (when the app came up), then take Serve and the writers down (no Ray processes
    left behind)."""
    if flush:
        try:
            flushed = serve.get_app_handle("bicascade").options(method_name="flush").remote().result(timeout_s=60)
            log.info("flushed %d cached embeddings", flushed)
        except Exception as e:  # a replica lost on the way out: what it held is gone, say so
            log.warning("could not flush the caches: %s", e)
    serve.shutdown()
    ray.shutdown()


def follow(config: AppConfig, host: str, port: int, done: threading.Event, every_s: float = 5.0) -> None:
    """Redeploy when the database records another ladder (`bicascade migrate`): Serve replaces the replicas whose
    arguments changed and keeps the old ones answering until the new ones are up, so no request is refused."""
    from bicascade.storage import tables

    db = tables.Database(config.db)
    seen = [r["fingerprint"] for r in db.recorded_ladder()]
    while not done.wait(every_s):
        now = [r["fingerprint"] for r in db.recorded_ladder()]
        if now != seen:
            log.info("%s records another ladder: redeploying", config.db)
            try:
                deploy(config, host, port)
                seen = now
                log.info("now serving %s", db.recorded_ladder()[0]["ladder"])
            except Exception as e:  # keep serving the old app; try again on the next change
                log.error("redeploy failed, still serving the previous ladder: %s", e)


def serve_forever(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, dashboard: bool = False) -> None:
    done = threading.Event()
    Keys.load(config.api_keys)  # a bad key file fails before a cluster starts
    url = None
    try:
        cluster.connect(runtime_env(), dashboard=dashboard)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a SIGTERM handler that aborts
            signal.signal(sig, lambda *_: done.set())
        url = deploy(config, host, port)
        if config.ladder is None:  # following the database: a migration's new ladder is deployed as it lands
            threading.Thread(target=follow, args=(config, host, port, done), daemon=True).start()
        log.info("serving %s on %s (the search page at /, POST /search, GET /images/{id}, /stats, /metrics, "
                 "/healthz%s); Ctrl-C stops", config.db, url, ", API keys on" if config.api_keys or
                 os.environ.get("BICASCADE_API_KEYS") else "")
        done.wait()
        log.info("stopping")
    finally:
        stop(flush=url is not None)
