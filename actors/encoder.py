"""One cascade level as a Ray Serve deployment: loads its CLIP model once, batches texts and images across queries."""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from ray import serve

from bicascade import images, models
from bicascade.errors import StaleEncoder
from bicascade.query import encode_stored
from bicascade.storage import tables

log = logging.getLogger("bicascade")


@serve.deployment  # options (autoscaling, queues, resources): serve/config.yaml
class Encoder:
    """Text and image encoder of one level; a GPU fraction per replica comes from the app config when GPUs exist."""

    def __init__(self, model: models.ModelSpec, db: str, threads: int = 1) -> None:
        models.set_threads(threads)  # Ray sets OMP_NUM_THREADS=1; replicas share the cores
        self.model = models.load_model(model)
        self.db = tables.Database(db)
        self.encoded = 0
        log.info("encoder %s ready on %s", model.name, self.model.device)

    def _mine(self, calls: list[tuple]) -> list:
        """The payloads of (payload, fingerprint) calls, all of which must be for this replica's model."""
        if any(fp != self.model.fingerprint for _, fp in calls):
            raise StaleEncoder(f"encoder of {self.model.spec.name} ({self.model.fingerprint}) asked for another model")
        return [payload for payload, _ in calls]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def encode_texts(self, calls: list[tuple[str, str]]) -> list[np.ndarray]:
        """(query text, fingerprint) calls of concurrent queries, embedded in one pass."""
        return list(await asyncio.to_thread(self.model.encode_texts, self._mine(calls)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def encode_images(self, calls: list[tuple[list[str], str]]) -> list[np.ndarray]:
        """Each call is one query's misses of this level; concurrent queries share one forward pass."""
        id_lists = self._mine(calls)
        flat = [i for ids in id_lists for i in ids]
        out = await asyncio.to_thread(encode_stored, self.model, self.db, flat)
        self.encoded += len(flat)
        bounds = np.cumsum([0] + [len(ids) for ids in id_lists])
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def encode_upload(self, calls: list[tuple[bytes, str]]) -> list[np.ndarray]:
        """Query images sent by clients: decoded here (bounded in bytes and pixels before decoding), one vector each."""
        blobs = self._mine(calls)

        def run() -> np.ndarray:
            crops = np.stack([self.model.preprocess.crop(images.load(b, max_pixels=images.MAX_UPLOAD_PIXELS).rgb)
                              for b in blobs])
            return self.model.encode_crops(crops)
        return list(await asyncio.to_thread(run))

    def info(self) -> dict:
        return {"model": self.model.spec.name, "fingerprint": self.model.fingerprint, "dim": self.model.dim,
                "encoded": self.encoded, "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.model.device), "resources": ray.get_runtime_context().get_assigned_resources()}
