"""One cascade level as a Ray Serve deployment: loads its CLIP model once, batches texts and images across queries."""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from ray import serve

from bicascade import images, models
from bicascade.storage import tables

log = logging.getLogger("bicascade")


def encode_stored(model: models.LoadedModel, db: tables.Database, ids: list[str]) -> np.ndarray:
    """Encode images by id from the `images` table (their bytes never travel through the router)."""
    blobs = db.image_bytes(ids)
    missing = [i for i in ids if i not in blobs]
    if missing:
        raise KeyError(f"{len(missing)} ids are not in {db.uri}/{tables.IMAGES}, e.g. {missing[0]}")
    return model.encode_images([images.to_rgb(images.decode(blobs[i])) for i in ids])


@serve.deployment  # options (autoscaling, queues, resources): serve/config.yaml
class Encoder:
    """Text and image encoder of one level; a GPU fraction per replica comes from the app config when GPUs exist."""

    def __init__(self, model: models.ModelSpec, db: str, threads: int = 1) -> None:
        models.set_threads(threads)  # Ray sets OMP_NUM_THREADS=1; replicas share the cores
        self.model = models.load_model(model)
        self.db = tables.Database(db)
        self.encoded = 0
        log.info("encoder %s ready on %s", model, self.model.device)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(self.model.encode_texts, texts))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def encode_images(self, id_lists: list[list[str]]) -> list[np.ndarray]:
        """Each call is one query's misses of this level; concurrent queries share one forward pass."""
        flat = [i for ids in id_lists for i in ids]
        out = await asyncio.to_thread(encode_stored, self.model, self.db, flat)
        self.encoded += len(flat)
        bounds = np.cumsum([0] + [len(ids) for ids in id_lists])
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def info(self) -> dict:
        return {"model": self.model.spec.name, "fingerprint": self.model.fingerprint, "dim": self.model.dim,
                "encoded": self.encoded, "node": ray.get_runtime_context().get_node_id()}
