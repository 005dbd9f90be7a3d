"""What every process knows of a ladder's levels without loading a model: the registry entry (ModelSpec), each
level's fingerprint, dim, cost and text tower (LevelInfo), and a resolved ladder. No torch, no open_clip: the
ingress (and its Router) and the cache writers import only this, so replicas that run no model start without them."""
from __future__ import annotations

from dataclasses import dataclass

HF_HUB = "hf-hub:"  # open_clip's prefix of a Hugging Face hub model


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: an open_clip architecture (or `hf-hub:ORG/REPO`) plus where its weights come from (which
    of the fields below is set decides its kind: bicascade.kinds)."""

    name: str
    arch: str
    pretrained: str | None = None  # open_clip pretrained tag (needs the model hub)
    checkpoint: str | None = None  # local state-dict or open_clip checkpoint; takes precedence over `pretrained`
    seed: int | None = None  # random weights from this seed (tests only): a bare ARCH level
    keep_patches: float | None = None  # a ViT on this fixed fraction of its patch tokens: a cheaper, untrained level
    kind: str | None = None  # a level kind registered beyond the built-in ones (bicascade.kinds), by name
    source: str | None = None  # that kind's own argument (a path, a URL, ...)


@dataclass(frozen=True)
class LevelInfo:
    """One level of a ladder, as `bicascade.query.level_infos` resolved it."""

    spec: ModelSpec
    fingerprint: str  # keys the level's embedding table
    dim: int
    gflops: float  # image encoder, per image
    text: int  # the first level with this level's text tower: whose text embedding this level uses

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class ResolvedLadder:
    """A ladder as a database serves it: its name, and every level's spec and info."""

    name: str
    levels: list[LevelInfo]

    @property
    def names(self) -> list[str]:
        return [lv.name for lv in self.levels]

    @property
    def specs(self) -> list[ModelSpec]:
        return [lv.spec for lv in self.levels]
