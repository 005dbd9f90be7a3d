"""Shared fixtures: an isolated cache directory so tests never touch the user's checkpoints or ladders, and a
tiny indexed corpus for the serving tests."""
import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
import torch


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


@pytest.fixture(scope="session")
def indexed_ladder(tmp_path_factory):
    """A context manager: ladder `name` trained in a cache of its own (kept while the context lasts) and its world's
    test split indexed into a fresh db with its level 0; gives (ladder, world root, db)."""
    import ray

    from bicascade.pipelines import index, train

    @contextlib.contextmanager
    def make(name: str):
        old = os.environ.get("BICASCADE_CACHE")
        os.environ["BICASCADE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
        try:
            ladder, root = train.ensure_ladder(name)
            db = str(tmp_path_factory.mktemp("db"))
            try:
                index.run_index(str(root / "test"), db, name)
            finally:
                ray.shutdown()
            yield ladder, root, db
        finally:
            os.environ.pop("BICASCADE_CACHE") if old is None else os.environ.update(BICASCADE_CACHE=old)
    return make


@pytest.fixture(scope="module")
def tiny_db(indexed_ladder):
    """The synthetic-tiny ladder's 300 test images indexed into a fresh db; the module shares its cache."""
    with indexed_ladder("synthetic-tiny") as (_, _, db):
        yield db


@pytest.fixture(scope="session")
def free_port():
    """A function giving a port free on 127.0.0.1 right now (servers bind 127.0.0.1 only)."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return pick


@pytest.fixture(scope="session")
def wait_healthy():
    """A function that waits until a server subprocess answers GET /healthz (and fails if it dies first)."""
    import requests

    def wait(url: str, proc, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if requests.get(f"{url}/healthz", timeout=2).ok:
                    return
            except requests.RequestException:  # not listening yet, or the app is still deploying
                pass
            time.sleep(1)
        raise TimeoutError(url)
    return wait


@pytest.fixture(scope="session")
def serve_command():
    """A function starting `bicascade serve` as a user does: its own local Ray cluster, its own process group."""
    def start(db: str, ladder: str, port: int, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "bicascade.cli", "serve", "--db", db, "--ladder", ladder,
                                 "--port", str(port), *args], stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    return start
