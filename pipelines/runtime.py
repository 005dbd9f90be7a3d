"""Start a local Ray cluster that listens on loopback only, or join the one named by RAY_ADDRESS; start Serve's HTTP
front on it (through its proxies, or straight into the ingress replica) and take it all down again.

Ray 2.60 on Linux rewrites a node IP of 127.0.0.1 to the machine's interface address (ray-project/ray#26293, #59110)
unless its cluster mode is off, and Serve binds each replica's gRPC server to [::] whatever the node IP; a local
cluster turns the first off and rebinds the second (`loopback_grpc`, run in every worker), so that no socket of it
listens beyond 127.0.0.1. Joining an existing cluster changes nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"
SETUP_HOOK = "bicascade.pipelines.runtime.loopback_grpc"


def free_port(host: str = LOOPBACK) -> int:
    """A port free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def connect(runtime_env: dict | None = None, dashboard: bool = False, **kwargs: Any) -> None:
    """ray.init for every bicascade job: a local cluster sized to this machine, bound to 127.0.0.1, no dashboard
    unless asked; with RAY_ADDRESS set, the existing cluster as it is."""
    import ray

    if ray.is_initialized():
        return
    # ray.init forks and execs its processes at once: nothing of lancedb's runtime is used in the child
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    env = dict(runtime_env or {})
    opts: dict[str, Any] = {"include_dashboard": dashboard, "log_to_driver": False, "namespace": "bicascade"}
    address = os.environ.get("RAY_ADDRESS")
    if not address or address.rsplit(":", 1)[0] in (LOOPBACK, "localhost"):
        local_only()  # our own cluster, or a loopback one joined by address: 127.0.0.1, not the interface address
    if address:  # its workers were started with the cluster's environment, not this one's
        env["env_vars"] = {**forwarded(), **env.get("env_vars", {})}
    else:
        env.setdefault("worker_process_setup_hook", SETUP_HOOK)
        # "local": always a cluster of our own, never one a stray `ray start` left running on this machine
        opts |= {"address": "local", "num_cpus": os.cpu_count(), "_node_ip_address": LOOPBACK}
        if dashboard:
            opts["dashboard_host"] = LOOPBACK
    ray.init(runtime_env=env, **(opts | kwargs))


def direct_ingress(port: int) -> None:
    """Serve's direct ingress (Ray 2.60, experimental): the ingress replica answers HTTP on `port` itself, so no proxy
    process sits between the client and the app (on 2 cores it tripled the searches/s, bench/query.py). One ingress
    replica, since the port is one. Set before the local cluster starts: Serve's controller reads these once, in
    the process the cluster starts for it."""
    if os.environ.get("RAY_ADDRESS"):
        from bicascade.errors import BadInputError

        raise BadInputError("direct ingress starts a cluster of its own: unset RAY_ADDRESS, or serve through "
                            "Serve's proxies without it")
    os.environ |= {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                   "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),  # the range is [min, max): this port only
                   "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
                   "RAY_SERVE_PORT_QUARANTINE_S": "0",  # a restarted replica takes the port back at once
                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0.5"}  # no load balancer to tell: 30 s


def direct_ingress_on() -> bool:
    return os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"


def start_serve(host: str = LOOPBACK, port: int = 8000) -> int:
    """Serve's controller and HTTP proxy on the connected cluster; the port clients use (with direct ingress the
    proxy takes a free port of its own, unused, and the ingress replica the one asked for)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": free_port(host) if direct_ingress_on() else port})
    return port


def shutdown(then: Callable[[], None] | None = None) -> None:
    """Serve (every app, its controller and proxies), then `then` (what the apps left on the cluster), then this
    process's connection to Ray (and the local cluster it started)."""
    import ray
    from ray import serve

    serve.shutdown()
    if then is not None:
        then()
    stop_handle_loop()
    ray.shutdown()


def stop_handle_loop(timeout_s: float = 5.0) -> None:
    """Stop the event loop thread that Serve's handles share in this process (Ray 2.60's SingletonThreadRouter)
    and wait until it has stopped. Its periodic tasks (long polls, the loop monitor's metrics) call into Ray, and
    one that runs after `ray.shutdown` ends the whole process with exit code 1 ("The core worker has already been
    shutdown ... The process will exit"): a test run's pytest died that way right after an in-process server
    stopped. A later handle starts a new loop."""
    try:
        from ray.serve._private.router import SingletonThreadRouter
    except ImportError:  # another Ray: nothing of ours to stop
        return
    with SingletonThreadRouter._asyncio_loop_creation_lock:
        loop, SingletonThreadRouter._asyncio_loop = SingletonThreadRouter._asyncio_loop, None
        SingletonThreadRouter._event_loop_monitor = None
    if loop is None:
        return
    loop.call_soon_threadsafe(loop.stop)
    deadline = time.monotonic() + timeout_s
    while loop.is_running() and time.monotonic() < deadline:
        time.sleep(0.01)


FORWARDED = ("AWS_", "BICASCADE_", "GOOGLE_", "AZURE_", "HF_")


def forwarded() -> dict[str, str]:
    """The variables a job's workers need from the process that submits it: where and how to reach the database
    (object-store credentials and endpoints), bicascade's own settings, and the model hub's (HF_HOME, its cache;
    HF_HUB_OFFLINE; a token)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}


def local_only() -> None:
    """Keep a node IP of 127.0.0.1 as given (Ray resolves it to the interface address in cluster mode)."""
    import ray._private.ray_constants as constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for processes started from here (CLI tools, drivers)
    constants.ENABLE_RAY_CLUSTER = False


REPLICA = "ray.serve._private.replica"


def loopback_grpc() -> None:
    """worker_process_setup_hook: bind Serve's replica gRPC servers to the node IP instead of [::] (clients dial
    node_ip:port already, so nothing else changes; on a real cluster the node IP is the node's own address).

    It runs in every worker of the job, and importing Serve's replica module costs a second of CPU: a worker that is
    no Serve replica (a cache writer, an index job's encoder) never imports it, so the patch waits for the import."""
    if REPLICA in sys.modules:
        _bind_replica_grpc_to_node_ip(sys.modules[REPLICA])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches Serve's replica module right after whoever needs it imports it (Serve, in a replica process)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != REPLICA:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module  # a loader of this module alone: wrapping it touches no other import

        def exec_then_patch(module: Any) -> None:
            run(module)
            _bind_replica_grpc_to_node_ip(module)
        spec.loader.exec_module = exec_then_patch
        return spec


def _bind_replica_grpc_to_node_ip(replica: Any) -> None:
    import ray
    import ray.serve._private.default_impl as default_impl

    def node_address(address: str) -> str:
        if address.startswith("[::]:"):
            host = ray.util.get_node_ip_address()
            return f"{f'[{host}]' if ':' in host else host}:{address[len('[::]:'):]}"
        return address

    if getattr(replica, "_bicascade_loopback", False):
        return
    add_port, add_address = replica.add_port_to_grpc_server, default_impl.add_grpc_address
    replica.add_port_to_grpc_server = lambda server, address: add_port(server, node_address(address))
    default_impl.add_grpc_address = lambda server, address: add_address(server, node_address(address))
    replica._bicascade_loopback = True
