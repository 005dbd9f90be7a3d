"""`bicascade serve`: start the app on a local (or RAY_ADDRESS) Ray cluster, serve until Ctrl-C or SIGTERM, then
flush the cache writers and shut everything down."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import ray
from ray import serve

from bicascade.errors import BadInputError
from bicascade.pipelines import runtime
from bicascade.serve.access import Keys
from bicascade.serve.app import AppConfig
from bicascade.serve.build import build
from bicascade.serve.config import runtime_env

log = logging.getLogger("bicascade")


def deploy(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "bicascade",
           route_prefix: str = "/") -> str:
    """Deploy the app and return its URL once every deployment is healthy."""
    if runtime.direct_ingress_on():
        if config.replicas.get("Api", 1) != 1:
            raise BadInputError("direct ingress serves one port from one Api replica: drop Api from --replicas")
        config.replicas["Api"] = 1
    port = runtime.start_serve(host, port)
    serve.run(build(config), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def start(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "bicascade",
          route_prefix: str = "/", direct: bool = False) -> str:
    if direct:
        runtime.direct_ingress(port)
    runtime.connect(runtime_env())
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
    runtime.shutdown(then=release)  # the writers last: stopping replicas may still send them writes


def release() -> None:
    """Kill the detached actors the apps left on the cluster (cache writers, metrics hubs, rate quotas), each cache
    writer after one more flush (writes the stopping replicas sent after the app's flush): on a local cluster
    ray.shutdown would kill them, but a joined one (RAY_ADDRESS) keeps them until the cluster goes."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "bicascade" and a["name"].startswith("bicascade-")]
    actors = {}
    for name in names:
        with contextlib.suppress(ValueError):  # gone meanwhile
            actors[name] = ray.get_actor(name, namespace="bicascade")
    writers = [a for name, a in actors.items() if name.startswith("bicascade-cache-")]
    try:
        ray.get([w.flush.remote() for w in writers], timeout=60)
    except Exception as e:  # a writer lost on the way out: what it held is gone, say so
        log.warning("could not flush a cache writer: %s", e)
    for actor in actors.values():
        ray.kill(actor, no_restart=True)


def follow(config: AppConfig, host: str, port: int, done: threading.Event, every_s: float = 5.0) -> None:
    """Redeploy when the database records another ladder (`bicascade migrate`): Serve replaces the replicas whose
    arguments changed and keeps the old ones answering until the new ones are up, so no request is refused."""
    from bicascade.storage import tables

    db = tables.Database(config.db)
    seen = [r["fingerprint"] for r in db.recorded_ladder()]
    while not done.wait(every_s):
        now = [r["fingerprint"] for r in db.recorded_ladder()]
        if now == seen:
            continue
        if runtime.direct_ingress_on():  # a new Api replica would need the port the old one holds
            log.warning("%s now records ladder %s; direct ingress cannot swap it in while serving: restart "
                        "`bicascade serve` to serve it", config.db, db.recorded_ladder()[0]["ladder"])
            seen = now
        else:
            log.info("%s records another ladder: redeploying", config.db)
            try:
                deploy(config, host, port)
                seen = now
                log.info("now serving %s", db.recorded_ladder()[0]["ladder"])
            except Exception as e:  # keep serving the old app; try again on the next change
                log.error("redeploy failed, still serving the previous ladder: %s", e)


def serve_forever(config: AppConfig, host: str = "127.0.0.1", port: int = 8000, dashboard: bool = False,
                  direct: bool = False) -> None:
    done = threading.Event()
    Keys.read(config.api_keys)  # a bad key file fails before a cluster starts
    if direct:
        runtime.direct_ingress(port)
    url = None
    try:
        runtime.connect(runtime_env(), dashboard=dashboard)
        # after ray.init, which installs a SIGTERM handler that aborts; set from a thread: a second signal arriving
        # while the handler is inside Event.set would wait forever on the lock the first one holds (seen here)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: threading.Thread(target=done.set, daemon=True).start())
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
