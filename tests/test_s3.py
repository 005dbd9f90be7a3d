"""The object-storage path end to end, against a real S3-compatible server (moto) on 127.0.0.1: images read from
s3://, indexed into a LanceDB database on s3://, served from it, and the cache written back to it."""
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import cli_json, free_port, serving

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
LADDER = "synthetic-tiny"
BUCKET = "bicascade-test"
QUERY = "two small orange diamonds in a row"


@pytest.fixture(autouse=True)
def isolated_cache(tiny_session, monkeypatch):  # the run's tiny ladder, trained once
    monkeypatch.setenv("BICASCADE_CACHE", tiny_session[0])


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server in its own process and the environment that points boto3, pyarrow and LanceDB at it."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT": endpoint,
           "AWS_ALLOW_HTTP": "true"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket=BUCKET)
        yield env, client
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_index_serve_and_write_back_on_s3(s3_env):
    from bicascade.pipelines.lab import train

    env, client = s3_env
    _, root = train.ensure_ladder(LADDER)
    files = sorted((root / "test").rglob("*.png"))[:120]
    for f in files:
        client.upload_file(str(f), BUCKET, f"images/{f.relative_to(root / 'test')}")
    db = f"s3://{BUCKET}/db"

    first = cli_json("index", f"s3://{BUCKET}/images", "--db", db, "--ladder", LADDER, env=env)
    assert first["rows"] == first["new_rows"] == len(files) and first["errors"] == 0
    again = cli_json("index", f"s3://{BUCKET}/images", "--db", db, env=env)
    assert again["new_rows"] == 0 and again["skipped"] == len(files)  # resumable on object storage too

    with serving(db, env=env) as server:
        served = requests.post(f"{server.url}/search", json={"query": QUERY, "k": 5}, timeout=120).json()
        image = requests.get(f"{server.url}/images/{served['results'][0]['id']}", timeout=30)
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert server.stop() == 0, server.stderr[-4000:]  # SIGTERM flushes the cache writers to s3://
    encoded = [lv["encoded"] for lv in served["stats"]["levels"][1:]]
    assert all(n > 0 for n in encoded)

    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="db/")
            for o in page.get("Contents", [])]
    tables = {k.split("/")[1] for k in keys}
    assert "images.lance" in tables and sum(t.startswith("emb_") for t in tables) == 3, tables

    # A new process reads the written-back embeddings from s3:// and encodes nothing; results equal the server's.
    replay = cli_json("search", QUERY, "--db", db, "--k", "5", env=env)
    assert [r["id"] for r in replay["results"]] == [r["id"] for r in served["results"]]
    assert all(lv["encoded"] == 0 and lv["cache_hits"] == lv["candidates"] for lv in replay["stats"]["levels"][1:])
    assert all(r["uri"].startswith(f"s3://{BUCKET}/images/") for r in replay["results"])
