"""Per-level encoder cost (FLOPs counted on the real architecture, measured seconds) and the `bicascade costs`
report (Eq. 1 / Eq. 2 themselves live in `bicascade.cascade`: the Router computes them and imports no torch)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from bicascade import kinds, models, registry
from bicascade.cascade import DEFAULT_CUTOFFS, f_latency, f_life


def _spec(model: str | models.ModelSpec) -> models.ModelSpec:
    return model if isinstance(model, models.ModelSpec) else registry.get_model(model)


def _meta_model(arch: str) -> torch.nn.Module:
    """`arch` on the meta device: shapes without weights, for counting."""
    with torch.device("meta"):
        return models.create(arch, device="meta").eval()  # eval: batch norm at 1x1


def _gflops(model: torch.nn.Module, run: Callable[[torch.nn.Module], object]) -> float:
    """GFLOPs (2 x multiply-accumulates) of `run(model)`, counted on the meta device: no weights."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run(model)
    return counter.get_total_flops() / 1e9


@cache
def _image_gflops(arch: str, changed_by: models.ModelSpec | None = None) -> float:
    """An architecture's image GFLOPs; with `changed_by`, as that level's kind changes the architecture."""
    model = _meta_model(arch)
    if changed_by:
        model = kinds.of(changed_by).change(model, changed_by)
    size = models.image_size(arch)
    return _gflops(model, lambda m: m.encode_image(torch.empty(1, 3, size, size, device="meta")))


@cache
def _text_gflops(arch: str) -> float:
    length = models.model_config(arch)["text_cfg"].get("context_length", 77)
    return _gflops(_meta_model(arch), lambda m: m.encode_text(torch.zeros(1, length, dtype=torch.long, device="meta")))


def image_gflops(model: str | models.ModelSpec) -> float:
    """Image-encoder GFLOPs for one image: the architecture's, as the level's kind changes it."""
    spec = _spec(model)
    kind = kinds.find(spec)
    return _image_gflops(spec.arch, spec if kind and kind.change else None)


def text_gflops(model: str | models.ModelSpec) -> float:
    """Text-encoder GFLOPs for one query of the model's full context length."""
    return _text_gflops(_spec(model).arch)


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


@dataclass
class CostRow:
    cascade: list[str]
    gflops: list[float]
    f_life: float
    f_latency: float | None
    seconds_per_image: list[float] | None = None
    f_life_measured: float | None = None
    f_latency_measured: float | None = None


@dataclass
class CostReport:
    """The `bicascade costs` document. A 1-level row is compared with the costliest model in the whole call."""

    p: float
    m: list[int]
    reference: str
    cascades: list[CostRow]
    measure: dict | None = None

    def to_json(self) -> dict:
        rows = []
        for r in self.cascades:
            row = {"cascade": r.cascade, "gflops": r.gflops, "f_life": r.f_life, "f_latency": r.f_latency}
            if self.measure:
                row |= {"seconds_per_image": r.seconds_per_image, "f_life_measured": r.f_life_measured,
                        "f_latency_measured": r.f_latency_measured}
            rows.append(row)
        doc = {"p": self.p, "m": self.m, "reference": self.reference, "cascades": rows}
        return doc | ({"measure": self.measure} if self.measure else {})

    def format(self) -> str:
        measured = self.measure is not None
        head = f"{'cascade':<52} {'GFLOPs per level':<28} {'F_life':>7} {'F_lat':>6}"
        head += f" {'s/img (measured)':<28} {'F_life':>7} {'F_lat':>6}" if measured else ""
        lines = [f"p = {self.p}, m = {self.m}; 1-level rows compare with {self.reference}", head]
        for r in self.cascades:
            line = (f"{','.join(r.cascade):<52} {', '.join(f'{g:.2f}' for g in r.gflops):<28} "
                    f"{_fmt(r.f_life):>7} {_fmt(r.f_latency):>6}")
            if measured:
                secs = ", ".join(f"{s:.4f}" for s in r.seconds_per_image or [])
                line += f" {secs:<28} {_fmt(r.f_life_measured):>7} {_fmt(r.f_latency_measured):>6}"
            lines.append(line)
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def cascade_report(cascades: Sequence[Sequence[str]], p: float = 0.1, cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
                   measure: bool = False, batch_size: int = 4, device: str | None = None) -> CostReport:
    names = {n for c in cascades for n in c}
    gflops = {n: image_gflops(n) for n in names}
    timed = sorted(names, key=gflops.get) if measure else []
    seconds = {n: measure_seconds(n, batch_size, device=device) for n in timed}
    ref = max(names, key=gflops.get)

    def reductions(cost: dict[str, float], cascade: Sequence[str]) -> tuple[float, float | None]:
        c = [cost[n] for n in cascade]
        return (cost[ref] / c[0] if len(c) == 1 else f_life(c, p)), f_latency(c, cutoffs)

    rows = []
    for cascade in cascades:
        row = CostRow(list(cascade), [round(gflops[n], 3) for n in cascade], *reductions(gflops, cascade))
        if measure:
            row.seconds_per_image = [seconds[n] for n in cascade]
            row.f_life_measured, row.f_latency_measured = reductions(seconds, cascade)
        rows.append(row)
    about = {"batch_size": batch_size, "device": str(models.pick_device(device)[0]),
             "threads": torch.get_num_threads()} if measure else None
    return CostReport(p, list(cutoffs), ref, rows, about)


def ladder_cascades(levels: Sequence[str]) -> list[list[str]]:
    """Each level alone, every 2-level cascade [level, top], and the full ladder: the rows of the paper's Table 1."""
    levels = list(levels)
    rows = [[lv] for lv in levels] + [[lv, levels[-1]] for lv in levels[:-1]]
    return rows + ([levels] if len(levels) > 2 else [])
