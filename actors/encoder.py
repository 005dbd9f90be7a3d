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
    """Text and image encoders of one level, or of several cheap levels side by side (`build` groups levels below
    `AppConfig.group_gflops`: a tiny level's own replica process cost more CPU to start, importing torch and open_clip,
    than it ever computed). Calls name their model by fingerprint; a GPU fraction per replica comes from the app."""

    def __init__(self, model: models.ModelSpec | list[models.ModelSpec], db: str, threads: int = 1) -> None:
        models.set_threads(threads)  # Ray sets OMP_NUM_THREADS=1; replicas share the cores
        loaded = [models.load_model(spec) for spec in (model if isinstance(model, list) else [model])]
        self.models = {m.fingerprint: m for m in loaded}
        self.db = tables.Database(db)
        self.encoded = 0
        log.info("encoder %s ready on %s", ", ".join(m.spec.name for m in loaded), loaded[0].device)

    async def _each_model(self, calls: list[tuple], run) -> list:
        """`run(model, payloads)` once per model named in a batch of (payload, fingerprint) calls, in a worker thread;
        the results in call order. A fingerprint this replica does not hold is refused (StaleEncoder)."""
        groups: dict[str, list[int]] = {}
        for i, (_, fp) in enumerate(calls):
            if fp not in self.models:
                names = ", ".join(f"{m.spec.name} ({f})" for f, m in self.models.items())
                raise StaleEncoder(f"encoder of {names} asked for another model ({fp})")
            groups.setdefault(fp, []).append(i)
        out: list = [None] * len(calls)
        for fp, idx in groups.items():
            results = await asyncio.to_thread(run, self.models[fp], [calls[i][0] for i in idx])
            for i, r in zip(idx, results):
                out[i] = r
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def encode_texts(self, calls: list[tuple[str, str]]) -> list[np.ndarray]:
        """(query text, fingerprint) calls of concurrent queries, embedded in one pass per model."""
        return await self._each_model(calls, lambda model, texts: list(model.encode_texts(texts)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def encode_images(self, calls: list[tuple[list[str], str]]) -> list[np.ndarray]:
        """Each call is one query's misses of one level; concurrent queries share one forward pass per model."""
        def run(model: models.LoadedModel, id_lists: list[list[str]]) -> list[np.ndarray]:
            out = encode_stored(model, self.db, [i for ids in id_lists for i in ids])
            self.encoded += len(out)
            bounds = np.cumsum([0] + [len(ids) for ids in id_lists])
            return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return await self._each_model(calls, run)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def encode_upload(self, calls: list[tuple[bytes, str]]) -> list[np.ndarray]:
        """Query images sent by clients: decoded here (bounded in bytes and pixels before decoding), one vector each."""
        def run(model: models.LoadedModel, blobs: list[bytes]) -> list[np.ndarray]:
            crops = np.stack([model.preprocess.crop(images.decode(b, max_pixels=images.MAX_UPLOAD_PIXELS).rgb)
                              for b in blobs])
            return list(model.encode_crops(crops))
        return await self._each_model(calls, run)

    def info(self) -> dict:
        loaded = list(self.models.values())
        return {"model": loaded[0].spec.name, "models": [m.spec.name for m in loaded],
                "fingerprints": list(self.models), "dim": loaded[0].dim, "encoded": self.encoded,
                "node": ray.get_runtime_context().get_node_id(), "device": str(loaded[0].device),
                "resources": ray.get_runtime_context().get_assigned_resources()}
