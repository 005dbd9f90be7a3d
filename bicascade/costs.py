"""Per-level encoder cost (FLOPs counted on the real architecture, measured seconds) and the paper's Eq. 1 / Eq. 2."""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Callable, Sequence

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from bicascade import models


def _gflops(name: str, run: Callable[[torch.nn.Module, str], object]) -> float:
    """GFLOPs (2 x multiply-accumulates) of `run(model, arch)`, counted on the meta device: no weights."""
    arch = models.get_model(name).arch
    with torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run(model, arch)
    return counter.get_total_flops() / 1e9


@lru_cache(maxsize=None)
def image_gflops(name: str) -> float:
    """Image-encoder GFLOPs for one image."""
    return _gflops(name, lambda m, arch: m.encode_image(
        torch.empty(1, 3, models.image_size(arch), models.image_size(arch), device="meta")))


@lru_cache(maxsize=None)
def text_gflops(name: str) -> float:
    """Text-encoder GFLOPs for one query of the model's full context length."""
    return _gflops(name, lambda m, arch: m.encode_text(torch.zeros(
        1, open_clip.get_model_config(arch)["text_cfg"].get("context_length", 77), dtype=torch.long, device="meta")))


def measure_seconds(name: str, batch_size: int = 4, repeats: int = 3, device: str | None = None) -> float:
    """Wall-clock seconds per image of the image encoder (random weights) on this machine: best of `repeats`."""
    loaded = models.load_model(name, device=device, seed=0)
    size = models.image_size(loaded.spec.arch)
    pixels = torch.randn(batch_size, 3, size, size)
    loaded.encode_pixels(pixels)  # warm-up: allocator, kernels, autotuning
    best = float("inf")
    for _ in range(repeats):
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loaded.encode_pixels(pixels)  # .cpu() inside synchronises
        best = min(best, time.perf_counter() - t0)
    return best / batch_size


def f_life(costs: Sequence[float], p: float) -> float:
    """Eq. 1: lifetime cost of embedding the corpus with the top level over that of the cascade."""
    if len(costs) < 2:
        raise ValueError("Eq. 1 needs a cascade of at least 2 levels")
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    return costs[-1] / (costs[0] + p * sum(costs[1:]))


def f_latency(costs: Sequence[float], cutoffs: Sequence[int]) -> float | None:
    """Eq. 2: cold-cache encoding cost of [I_small, I_r] with cutoff m_1 over the deep cascade's; None below 3 levels."""
    if len(costs) < 3:
        return None
    levels = costs[1:]
    if len(cutoffs) < len(levels):
        raise ValueError(f"a {len(costs)}-level cascade needs {len(levels)} cutoffs, got {list(cutoffs)}")
    return cutoffs[0] * costs[-1] / sum(c * m for c, m in zip(levels, cutoffs))


def cascade_report(cascades: Sequence[Sequence[str]], p: float = 0.1, cutoffs: Sequence[int] = (50, 14),
                   measure: bool = False, batch_size: int = 4, device: str | None = None) -> dict:
    """The `bicascade costs` document. A 1-level entry is compared with the costliest model in the whole call."""
    names = {n for c in cascades for n in c}
    gflops = {n: image_gflops(n) for n in names}
    seconds = {n: measure_seconds(n, batch_size, device=device) for n in sorted(names, key=gflops.get)} if measure else {}
    ref = max(names, key=gflops.get)
    rows = []
    for cascade in cascades:
        row: dict = {"cascade": list(cascade), "gflops": [round(gflops[n], 3) for n in cascade]}
        for key, cost in [("", gflops)] + ([("_measured", seconds)] if measure else []):
            c = [cost[n] for n in cascade]
            row["f_life" + key] = cost[ref] / c[0] if len(c) == 1 else f_life(c, p)
            row["f_latency" + key] = f_latency(c, cutoffs)
        if measure:
            row["seconds_per_image"] = [seconds[n] for n in cascade]
        rows.append(row)
    doc: dict = {"p": p, "m": list(cutoffs), "reference": ref, "cascades": rows}
    if measure:
        doc["measure"] = {"batch_size": batch_size, "device": str(models.pick_device(device)[0]),
                          "threads": torch.get_num_threads()}
    return doc
