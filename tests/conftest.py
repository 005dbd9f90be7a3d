"""Shared fixtures and helpers: one loopback Ray cluster for the whole run, an isolated cache directory (tests never
touch the user's checkpoints or ladders), tiny indexed corpora, one way to run the CLI and one way to start and stop a
server.

The run's Ray cluster: started once when any selected test is marked `ray`, and named by RAY_ADDRESS for the rest of
the run, so every index job, `bicascade serve` and in-process app joins it instead of starting one of its own (each
start cost 5-10 s here). A test that kills or reconfigures Ray itself starts its own: it passes RAY_ADDRESS="" (or
a cluster of its own) to what it runs, and must never stop this one."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bicascade.pipelines.runtime import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# token auth off (on by default for `ray start`); keep 127.0.0.1 as the node IP (see bicascade.pipelines.runtime)
RAY_LOCAL = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
SHARED: dict[str, str] = {}  # {"address": ...} while the run's cluster is up


def start_cluster(num_cpus: int | None = None) -> str:
    """`ray start --head` on 127.0.0.1 only (no dashboard); its GCS address."""
    address = f"127.0.0.1:{free_port()}"
    cpus = num_cpus if num_cpus is not None else os.cpu_count()
    subprocess.run([RAY, "start", "--head", f"--port={address.split(':')[1]}", f"--num-cpus={cpus}",
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1",
                    "--disable-usage-stats"], check=True, env={**os.environ, **RAY_LOCAL}, timeout=180,
                   capture_output=True)
    return address


def stop_cluster(address: str) -> None:
    """Kill every process of the cluster at `address` (its GCS, raylets, workers), and no other cluster's: `ray stop`
    would stop every cluster on the machine, the run's shared one too."""
    import psutil

    port = address.rsplit(":", 1)[1]
    marks = (address, f"--gcs_server_port={port}", f"--gcs-address={address}")
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(m in cmd for m in marks) and p.pid != os.getpid():
            with contextlib.suppress(psutil.NoSuchProcess):
                for q in [*p.children(recursive=True), p]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        q.kill()


def pytest_collection_finish(session):
    if any("ray" in item.keywords for item in session.items) and not os.environ.get("RAY_ADDRESS"):
        t0 = time.monotonic()
        SHARED["address"] = os.environ["RAY_ADDRESS"] = start_cluster()
        os.environ.update({k: v for k, v in RAY_LOCAL.items() if k != "RAY_ADDRESS"})
        print(f"\nthe run's Ray cluster: {SHARED['address']} (up in {time.monotonic() - t0:.1f} s)")


def pytest_sessionfinish(session):
    if "address" in SHARED:
        stop_cluster(SHARED.pop("address"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("bicascade-cache")
    monkeypatch.setenv("BICASCADE_CACHE", str(path))
    return path


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    import torch  # only here: a run of the fast unit tests (and every mutant's) starts without it

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def cache_at(path):
    """BICASCADE_CACHE pointed at `path` while the context lasts (for fixtures wider than one test)."""
    old = os.environ.get("BICASCADE_CACHE")
    os.environ["BICASCADE_CACHE"] = str(path)
    try:
        yield path
    finally:
        os.environ.pop("BICASCADE_CACHE") if old is None else os.environ.update(BICASCADE_CACHE=old)


@pytest.fixture(scope="session")
def indexed_ladder(tmp_path_factory):
    """A context manager: ladder `name` trained in the run's training cache (one for every test: a teacher is
    trained once) and its world's test split indexed into a fresh db with its level 0; gives (ladder, world, db)."""
    import ray

    from bicascade.pipelines.ingest import index
    from bicascade.pipelines.lab import train

    trained = tmp_path_factory.mktemp("training-cache")

    @contextlib.contextmanager
    def make(name: str):
        with cache_at(trained):
            ladder, root = train.ensure_ladder(name)
            db = str(tmp_path_factory.mktemp("db"))
            try:
                index.run_index(str(root / "test"), db, name)
            finally:
                ray.shutdown()
            yield ladder, root, db
    return make


@pytest.fixture(scope="session")
def tiny_session(indexed_ladder):
    """The synthetic-tiny ladder trained once for the whole run and its 300 test images indexed once."""
    with indexed_ladder("synthetic-tiny") as (_, _, db):
        yield os.environ["BICASCADE_CACHE"], db


@pytest.fixture(scope="module")
def tiny_db(tiny_session, tmp_path_factory):
    """A copy of the indexed tiny corpus for this module (its caches start cold), with the session's ladder cache."""
    cache, db = tiny_session
    copy = str(tmp_path_factory.mktemp("tiny") / "db")
    shutil.copytree(db, copy)
    with cache_at(cache):
        yield copy


def verified(db: str):
    """`verify` against the database's recorded ladder, asserted clean; the report."""
    from bicascade.storage import tables, verify

    d = tables.Database(db)
    report = verify.verify(d, [r["fingerprint"] for r in d.recorded_ladder()])
    assert report.ok, report.problems
    return report


def cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`bicascade ARGS` as a user runs it, in a subprocess: on the run's Ray cluster when it needs one (env
    RAY_ADDRESS="" gives it a local cluster of its own)."""
    r = subprocess.run([sys.executable, "-m", "bicascade.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, f"bicascade {' '.join(args)} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


def cli_json(*args: str, **kw) -> dict:
    return json.loads(cli(*args, "--json", **kw).stdout)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until a server subprocess answers GET /healthz (and fail if it dies first)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else f"server exited {proc.returncode}"
        try:
            if requests.get(f"{url}/healthz", timeout=2).ok:
                return
        except requests.RequestException:  # not listening yet, or the app is still deploying
            pass
        time.sleep(1)
    raise TimeoutError(url)


class Served:
    """A running `bicascade serve` subprocess: its URL, its process, and `stop()` (SIGTERM, then the exit code)."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url
        self.stderr = ""

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:  # SIGTERM to the server alone, as `kill`, docker and Kubernetes send it: the
            os.kill(self.proc.pid, signal.SIGTERM)  # cluster it started must outlive it until its writers are flushed
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self.proc.stderr and not self.stderr:
            self.stderr = self.proc.stderr.read()
        return self.proc.returncode


@contextlib.contextmanager
def serving(db: str, *args: str, env: dict | None = None, wait: bool = True):
    """`bicascade serve --db DB ARGS` on a free loopback port in its own process group, on the run's Ray cluster
    (env RAY_ADDRESS="": a local cluster of its own), healthy on entry; stopped with SIGTERM on exit, and SIGKILLed
    with its whole group if it does not stop."""
    port = free_port()
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "bicascade.cli", "serve", "--db", db, "--port", str(port), *args],
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    served = Served(proc, f"http://127.0.0.1:{port}")
    try:
        if wait:
            wait_healthy(served.url, proc)
        yield served
    finally:
        clean = served.stop() == 0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of a cluster of its own outlives the test
        if not clean and env.get("RAY_ADDRESS") and env["RAY_ADDRESS"] == SHARED.get("address"):
            reset_shared()


def reset_shared() -> None:
    """Take Serve and the apps' detached actors off the run's cluster after a server that did not stop cleanly, so
    that the next test's `serve.start` gets its own port and no stale writer."""
    code = ("import ray; from ray import serve; from bicascade.serve import server; ray.init(namespace='bicascade'); "
            "serve.shutdown(); server.release(); ray.shutdown()")
    subprocess.run([sys.executable, "-c", code], env=os.environ, timeout=120, capture_output=True)


def listening(pids=None, marker: str | None = None) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of a process tree: the trees rooted at `pids`, or
    every process whose command line contains `marker` (e.g. a cluster's GCS address), and their descendants."""
    import psutil

    roots = [psutil.Process(p) for p in pids or []]
    if marker:
        roots += [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    procs = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    out = []
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out += [(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN]
    return sorted(set(out))


LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def ray_logs() -> str:
    """Every Ray log on this machine (every cluster's: the run's shared one and those tests start themselves)."""
    return "".join(p.read_text(errors="replace") for p in Path("/tmp/ray").glob("session_2*/logs/**/*")
                   if p.is_file() and p.stat().st_size < 50 << 20)


@pytest.fixture(scope="module")
def in_process_server():
    """A function starting the Serve app in this process (`bicascade.serve.server.start`) on a free port; every app
    it started is stopped, and Ray shut down, at the end of the module."""
    from bicascade.serve import server

    started = []

    def start(config) -> str:
        url = server.start(config, port=free_port())
        started.append(url)
        return url
    yield start
    if started:
        server.stop()
