"""The keep-patches level kind: a ViT level of any other kind run on a fixed share of its patch tokens (LEVEL#keep=F),
a cheaper level of the same weights without training. It owns its syntax, how the model is changed, what the change
adds to the fingerprint and the cheaper cost; the level's weights, checks and text tower stay its base kind's."""
from __future__ import annotations

from dataclasses import replace

import open_clip
import torch

from bicascade import kinds
from bicascade.errors import BadInputError
from bicascade.levels import ModelSpec

SYNTAX = "#keep="


class FixedPatches(torch.nn.Module):
    """Keep the class token and a fixed, spatially even `keep` fraction of a ViT's patch tokens, in training and in
    inference alike (open_clip's PatchDropout is random and training-only): the same weights on fewer tokens."""

    def __init__(self, grid: tuple[int, int], keep: float) -> None:
        super().__init__()
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        order = torch.argsort(torch.remainder(rows * 0.6180339887 + cols * 0.7548776662, 1.0).reshape(-1))  # R2
        kept = torch.sort(order[:max(1, round(keep * grid[0] * grid[1]))]).values
        self.register_buffer("index", torch.cat([torch.zeros(1, dtype=torch.long), kept + 1]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index.to(x.device))


def fraction(keep: object, where: str) -> float:
    try:
        k = float(keep)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        k = -1.0
    if not 0 < k < 1:
        raise BadInputError(f"{where}: keep must be a fraction of the patch tokens in (0, 1), got {keep!r}")
    return k


def keep(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """`model` (an open_clip CLIP, perhaps on the meta device) with its ViT on `spec`'s share of its patch tokens."""
    visual, k = model.visual, spec.keep_patches
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise BadInputError(f"keep_patches needs a ViT; {spec.arch} has a {type(visual).__name__} image tower")
    device = next(iter(visual.parameters())).device
    visual.patch_dropout = FixedPatches(visual.grid_size, k).to(device)
    return model


def base(spec: ModelSpec) -> ModelSpec:
    return replace(spec, keep_patches=None)


def _parse(text: str, j: int) -> dict | None:
    level, sep, k = text.rpartition(SYNTAX)
    if not sep:
        return None
    _, fields = kinds.parse(level, j)
    return {**fields, "keep_patches": fraction(k, f"level {text!r}")}


def _kind(spec: ModelSpec) -> kinds.Kind:
    return kinds.of(base(spec))


KIND = kinds.register(kinds.Kind(
    "keep-patches", f"LEVEL{SYNTAX}F", parse=_parse, build=lambda s: keep(_kind(s).build(base(s)), s),
    weights=lambda s: _kind(s).weights(base(s)),  # the same weights: levels share their base's text tower
    hashed=lambda s: {"keep_patches": s.keep_patches},
    label=lambda s: f"{(_kind(s).label or _kind(s).weights)(base(s))} on {s.keep_patches:.0%} of its patches",
    check=lambda s: (_kind(s).check or _kind(s).weights)(base(s)),
    change=keep,
    owns=lambda s: s.keep_patches is not None, suffix=lambda s: f"-p{round(100 * s.keep_patches)}",
    base=base))
