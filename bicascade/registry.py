"""The registries: models by name, and ladders (the paper's, and those users add, saved as JSON under the cache so
every later process sees them). No torch and no open_clip: an architecture is known by its open_clip config file."""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from bicascade.errors import BadInputError, UnknownNameError
from bicascade.levels import HF_HUB, ModelSpec

CONFIG_DIR = Path(__file__).parent / "model_configs"  # the project's own architectures (tiny synthetic ladder, tests)


@lru_cache(maxsize=1)
def architectures() -> frozenset[str]:
    """open_clip's architectures and the project's, by their config files (what open_clip.list_models() lists)."""
    found = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (found.submodule_search_locations or [])] if found else []
    return frozenset(p.stem for folder in [*folders, CONFIG_DIR] for p in folder.glob("*.json"))


@dataclass(frozen=True)
class Ladder:
    """Models of one cascade, cheapest first."""

    name: str
    levels: tuple[str, ...]
    shared_text_tower: bool = False
    description: str = ""


_MODELS: dict[str, ModelSpec] = {}
_LADDERS: dict[str, Ladder] = {}
_BUILTIN: set[str] = set()


def register_model(spec: ModelSpec) -> ModelSpec:
    if not spec.arch.startswith(HF_HUB) and spec.arch not in architectures():
        raise UnknownNameError(f"model {spec.name!r}: open_clip has no architecture {spec.arch!r}")
    _MODELS[spec.name] = spec
    return spec


def register_ladder(ladder: Ladder) -> Ladder:
    if len(ladder.levels) < 1:
        raise BadInputError(f"ladder {ladder.name!r} has no levels")
    for name in ladder.levels:
        get_model(name)
    _LADDERS[ladder.name] = ladder
    return ladder


def get_model(name: str) -> ModelSpec:
    """A registered model, or a bare open_clip architecture (random weights unless a checkpoint is given)."""
    if name not in _MODELS and not _loading_user_ladders:
        load_user_ladders()  # another process may have trained it since
    if name in _MODELS:
        return _MODELS[name]
    if name in architectures():
        return ModelSpec(name=name, arch=name)
    raise UnknownNameError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))} "
                           f"(or any open_clip architecture: open_clip.list_models())")


def get_ladder(name: str) -> Ladder:
    load_user_ladders()
    if name not in _LADDERS:
        raise UnknownNameError(f"unknown ladder {name!r}; known: {', '.join(sorted(_LADDERS))}. "
                               "`bicascade ladders` lists them and the ones the project can train; "
                               "`bicascade ladders add NAME LEVEL...` makes one from your checkpoints")
    return _LADDERS[name]


def list_ladders() -> list[Ladder]:
    load_user_ladders()
    return list(_LADDERS.values())


def is_builtin(name: str) -> bool:
    return name in _BUILTIN


def cache_dir() -> Path:
    """Where trained checkpoints and user ladders live ($BICASCADE_CACHE or the user cache)."""
    if os.environ.get("BICASCADE_CACHE"):
        return Path(os.environ["BICASCADE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bicascade"


def ladder_file(name: str) -> Path:
    return cache_dir() / "ladders" / f"{name}.json"


def save_ladder(ladder: Ladder, specs: Sequence[ModelSpec]) -> Path:
    """Register a ladder and persist it so later processes (and `bicascade ladders`) see it."""
    if ladder.name in _BUILTIN:
        raise BadInputError(f"{ladder.name!r} is a built-in ladder: choose another name")
    for spec in specs:
        register_model(spec)
    register_ladder(ladder)
    path = ladder_file(ladder.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**asdict(ladder), "models": [asdict(s) for s in specs]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path


def remove_ladder(name: str) -> Path:
    path = ladder_file(name)
    if name in _BUILTIN:
        raise BadInputError(f"{name!r} is a built-in ladder and cannot be removed")
    if not path.exists():
        raise UnknownNameError(f"no saved ladder {name!r} in {path.parent}")
    path.unlink()
    _LADDERS.pop(name, None)
    return path


_loading_user_ladders = False


def load_user_ladders() -> None:
    global _loading_user_ladders
    folder = cache_dir() / "ladders"
    _loading_user_ladders = True
    try:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            doc = json.loads(path.read_text())
            for spec in doc.pop("models", []):
                register_model(ModelSpec(**spec))
            register_ladder(Ladder(name=doc["name"], levels=tuple(doc["levels"]),
                                   shared_text_tower=doc.get("shared_text_tower", False),
                                   description=doc.get("description", "")))
    finally:
        _loading_user_ladders = False


# The paper's ladders (Table 1), with their LAION-2B tags.
for _spec in [
    ModelSpec("ViT-B-16", "ViT-B-16", pretrained="laion2b_s34b_b88k"),
    ModelSpec("ViT-L-14", "ViT-L-14", pretrained="laion2b_s32b_b82k"),
    ModelSpec("ViT-g-14", "ViT-g-14", pretrained="laion2b_s34b_b88k"),
    ModelSpec("convnext_base_w", "convnext_base_w", pretrained="laion2b_s13b_b82k"),
    ModelSpec("convnext_large_d", "convnext_large_d", pretrained="laion2b_s26b_b102k_augreg"),
    ModelSpec("convnext_xxlarge", "convnext_xxlarge", pretrained="laion2b_s34b_b82k_augreg"),
]:
    register_model(_spec)
for _ladder in [Ladder("openclip-vit", ("ViT-B-16", "ViT-L-14", "ViT-g-14"), description="OpenCLIP ViTs, LAION-2B"),
                Ladder("openclip-convnext", ("convnext_base_w", "convnext_large_d", "convnext_xxlarge"),
                       description="OpenCLIP ConvNeXts, LAION-2B")]:
    register_ladder(_ladder)
    _BUILTIN.add(_ladder.name)


