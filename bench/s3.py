"""The phone corpus indexed from object storage against the same files on local disk, in one run: an S3 server (moto)
on 127.0.0.1 that waits 20 ms before answering every GET, as a remote bucket would, and `bicascade index` on both
(level 0 of the embedded `synthetic` ladder by default: a cheap encoder, so reading and decoding are what is
measured). Prints images/s end to end and after start-up, and their ratio. Not a test.

    python bench/s3.py [--n 60] [--latency-ms 20] [--ladder synthetic] [--out bench/results/s3_phone_cpu.json]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import boto3
from common import emit, free_port
from moto.server import DomainDispatcherApplication, create_backend_app
from photos import phone
from werkzeug.serving import make_server

from bicascade.pipelines.ingest import index
from bicascade.pipelines.lab import train


def slow_s3(latency_s: float) -> tuple[str, object]:
    """A threaded moto S3 server on 127.0.0.1 whose every GET waits `latency_s` first; its endpoint and server."""
    app = DomainDispatcherApplication(create_backend_app)

    def waiting(environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            time.sleep(latency_s)
        return app(environ, start_response)
    port = free_port()
    server = make_server("127.0.0.1", port, waiting, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", server


def rates(report: index.IndexReport) -> dict:
    steady = report.new_rows / max(1e-9, report.seconds - (report.startup_s or 0))
    return {"images": report.new_rows, "errors": report.errors, "seconds": report.seconds,
            "startup_s": report.startup_s, "images_per_s": report.images_per_s, "steady_images_per_s": round(steady, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60, help="phone photos (12 MP; a few HEIC, PNG and panoramas)")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--ladder", default="synthetic")
    p.add_argument("--out")
    a = p.parse_args()
    if a.ladder in train.PROFILES:
        train.ensure_ladder(a.ladder, with_world=False)
    endpoint, server = slow_s3(a.latency_ms / 1000)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT": endpoint,
                       "AWS_ALLOW_HTTP": "true"})  # before Ray starts: its workers inherit them
    try:
        with tempfile.TemporaryDirectory() as tmp:
            photos = Path(tmp) / "phone"
            made = phone(photos, a.n, seed=0)
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="photos")
            for f in sorted(photos.iterdir()):
                s3.upload_file(str(f), "photos", f"phone/{f.name}")
            local = rates(index.run_index(str(photos), str(Path(tmp) / "db-local"), a.ladder))
            remote = rates(index.run_index("s3://photos/phone", str(Path(tmp) / "db-s3"), a.ladder))
    finally:
        server.shutdown()
    emit({"files": made["files"], "bytes": made["bytes"], "latency_ms_per_get": a.latency_ms, "ladder": a.ladder,
          "local": local, "s3": remote,
          "s3_over_local": round(remote["images_per_s"] / local["images_per_s"], 3),
          "s3_over_local_steady": round(remote["steady_images_per_s"] / local["steady_images_per_s"], 3)}, a.out)


if __name__ == "__main__":
    main()
