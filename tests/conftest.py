"""Shared fixtures and helpers: an isolated cache directory (tests never touch the user's checkpoints or ladders),
tiny indexed corpora, one way to run the CLI and one way to start and stop a server."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from bicascade.pipelines.ingest.cluster import free_port


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("bicascade-cache")
    monkeypatch.setenv("BICASCADE_CACHE", str(path))
    return path


def pytest_collection_modifyitems(config, items):
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
    """`bicascade ARGS` as a user runs it: a subprocess with its own local Ray cluster when it needs one."""
    r = subprocess.run([sys.executable, "-m", "bicascade.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "RAY_ADDRESS": "", **(env or {})})
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
    """`bicascade serve --db DB ARGS` on a free loopback port in its own process group (its own Ray cluster), healthy
    on entry; stopped with SIGTERM on exit, and SIGKILLed with its whole group if it does not stop."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bicascade.cli", "serve", "--db", db, "--port", str(port), *args],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": "", **(env or {})})
    served = Served(proc, f"http://127.0.0.1:{port}")
    try:
        if wait:
            wait_healthy(served.url, proc)
        yield served
    finally:
        served.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of its Ray cluster outlives the test


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


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


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
