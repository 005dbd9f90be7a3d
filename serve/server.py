"""`bicascade serve`: start the app on a local (or RAY_ADDRESS) Ray cluster, serve until Ctrl-C or SIGTERM, then
flush the cache writers and shut everything down."""
from __future__ import annotations

import logging
import os
import signal
import threading

import ray
from ray import serve

from bicascade.serve.app import AppConfig, build, runtime_env

log = logging.getLogger("bicascade")


def connect() -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one sized to this machine."""
    if not ray.is_initialized():
        kwargs = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, namespace="bicascade", runtime_env=runtime_env(),
                 **kwargs)


def deploy(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "bicascade",
           route_prefix: str = "/") -> str:
    """Deploy the app and return its URL once every deployment is healthy."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(config), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def start(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "bicascade",
          route_prefix: str = "/") -> str:
    connect()
    return deploy(config, host, port, name, route_prefix)


def stop() -> None:
    """Flush pending cache writes, then take Serve and the writers down (no Ray processes left behind)."""
    try:
        flushed = serve.get_app_handle("bicascade").options(method_name="flush").remote().result(timeout_s=60)
        log.info("flushed %d cached embeddings", flushed)
    except Exception as e:  # the app may never have come up
        log.warning("could not flush the caches: %s", e)
    serve.shutdown()
    ray.shutdown()


def serve_forever(config: AppConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    done = threading.Event()
    try:
        connect()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a SIGTERM handler that aborts
            signal.signal(sig, lambda *_: done.set())
        url = deploy(config, host, port)
        log.info("serving %s on %s (POST /search, GET /images/{id}, /stats, /healthz); Ctrl-C stops", config.db, url)
        done.wait()
        log.info("stopping")
    finally:
        stop()
