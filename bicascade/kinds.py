"""Level kinds: what a level's model is. Each kind owns its LEVEL syntax, how its model is built, what goes into the
level's fingerprint, its image cost, how `ladders show` names its weights and the cheap check made before a job
starts. The built-in kinds (`bicascade.models`): ARCH=PATH (a checkpoint), ARCH (seeded random weights), ARCH@TAG
(an open_clip pretrained tag), hf-hub:ORG/REPO, and LEVEL#keep=F (`bicascade.patches`: a kind that changes a level of
another kind, its `base`). A new kind is one `register` call in one module:

    kinds.register(kinds.Kind("npz", "npz:ARCH=PATH", parse=..., weights=..., build=...))

and its levels are `ModelSpec(kind="npz", source=...)`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bicascade.errors import BadInputError, MissingWeightsError, UnknownNameError
from bicascade.levels import ModelSpec


@dataclass(frozen=True)
class Kind:
    name: str
    syntax: str  # as the README and errors write it
    # LEVEL text (and the level's position, for seeds) -> ModelSpec fields besides `name`; None: not this syntax
    parse: Callable[[str, int], dict[str, Any] | None]
    weights: Callable[[ModelSpec], str]  # the weights' identity: what the fingerprint hashes
    build: Callable[[ModelSpec], Any]  # the model with its weights, fp32 on the CPU (a torch.nn.Module)
    label: Callable[[ModelSpec], str] | None = None  # `ladders show`'s "weights" column (default: the identity)
    check: Callable[[ModelSpec], None] | None = None  # fail fast, in one line (default: compute the identity)
    owns: Callable[[ModelSpec], bool] | None = None  # built-in kinds read the spec's fields; others its `kind`
    hashed: Callable[[ModelSpec], dict[str, Any]] | None = None  # what the fingerprint hashes beside the weights
    # a kind that changes its base's model (keep-patches): the change, applied to the model it builds and to the
    # weightless one its cost is counted on
    change: Callable[[Any, ModelSpec], Any] | None = None
    suffix: Callable[[ModelSpec], str] | None = None  # what a level's default name adds after its architecture
    base: Callable[[ModelSpec], ModelSpec] | None = None  # a kind that changes another kind's level: that level


_KINDS: list[Kind] = []


def register(kind: Kind, first: bool = False) -> Kind:
    """Add a kind (a name already taken is replaced); its syntax is tried before the built-ins' with `first`. Kinds
    that change another kind's level are always tried first: they own a level whatever its base is."""
    global _KINDS
    rest = [k for k in _KINDS if k.name != kind.name]
    _KINDS = sorted([kind, *rest] if first else [*rest, kind], key=lambda k: k.base is None)  # stable
    return kind


def known() -> list[Kind]:
    return list(_KINDS)


def find(spec: ModelSpec) -> Kind | None:
    """The kind of `spec`, None for an architecture given no weights yet (its cost is still known)."""
    return next((k for k in _KINDS if (k.owns(spec) if k.owns else spec.kind == k.name)), None)


def of(spec: ModelSpec) -> Kind:
    if kind := find(spec):
        return kind
    if spec.kind is None:
        raise MissingWeightsError(f"model {spec.name!r} has neither a checkpoint nor a pretrained tag; give it a "
                                  "checkpoint (ARCH=PATH) or a tag (ARCH@TAG)")
    raise UnknownNameError(f"model {spec.name!r}: no level kind {spec.kind!r} is registered in this process "
                           f"(known: {', '.join(k.name for k in _KINDS)})")


def parse(text: str, j: int) -> tuple[Kind, dict[str, Any]]:
    """The kind whose syntax `text` is, and the spec fields it gives."""
    for kind in _KINDS:
        fields = kind.parse(text, j)
        if fields is not None:
            return kind, fields
    raise BadInputError(f"level {text!r}: not a LEVEL ({' | '.join(k.syntax for k in _KINDS)})")
