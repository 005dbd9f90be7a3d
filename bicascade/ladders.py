"""Ladders made from the command line: LEVEL strings and YAML files, validated when they are added (the weights load
into their architecture, levels rise in image FLOPs, text towers are compared) and saved for every later process.

LEVEL, cheapest first:  ARCH@TAG (open_clip pretrained tag, needs the model hub)  |  ARCH=PATH (a local state dict or
open_clip checkpoint)  |  hf-hub:ORG/REPO (open_clip's hub syntax)  |  ARCH (random weights: tests only); any ViT
LEVEL ending in #keep=F is that model on a fixed fraction F of its patch tokens: a cheaper level without training.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bicascade import costs, kinds, models, patches, registry
from bicascade.errors import BadInputError

log = logging.getLogger("bicascade")


def parse_level(text: str, ladder: str, j: int) -> models.ModelSpec:
    """One LEVEL string -> a model spec named `<ladder>/<arch>` plus what its kind adds (`-p25` for #keep=0.25: a
    ladder may hold the full model too); its syntax is its kind's (bicascade.kinds)."""
    kind, fields = kinds.parse(text.strip(), j)
    spec = models.ModelSpec(f"{ladder}/{fields['arch'].removeprefix(models.HF_HUB).replace('/', '--')}", **fields)
    return replace(spec, name=spec.name + kind.suffix(spec)) if kind.suffix else spec


def from_yaml(path: str | Path, name: str | None = None) -> tuple[str, list[models.ModelSpec], str]:
    """A ladder file (the README has the schema): its name (or `name`), level specs and description."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BadInputError(f"cannot read ladder file {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("levels"), list) or not doc["levels"]:
        raise BadInputError(f"{path}: expected a mapping with a non-empty `levels` list")
    unknown = set(doc) - {"name", "description", "levels"}
    if unknown:
        raise BadInputError(f"{path}: unknown keys {sorted(unknown)} (name, description, levels)")
    if name and doc.get("name") and doc["name"] != name:
        raise BadInputError(f"{path} names ladder {doc['name']!r}, the command {name!r}")
    name = name or doc.get("name")
    if not name:
        raise BadInputError(f"{path} has no `name`: give one on the command line")
    specs = [_yaml_level(item, name, j, path) for j, item in enumerate(doc["levels"])]
    return name, specs, str(doc.get("description", ""))


def _yaml_level(item: Any, ladder: str, j: int, path: Path) -> models.ModelSpec:
    if isinstance(item, str):
        arch, eq, ckpt = item.partition("=")
        if eq and not item.startswith(models.HF_HUB) and not Path(ckpt).expanduser().is_absolute():
            item = f"{arch}={path.parent / ckpt}"  # relative to the file, not to where the command runs
        return parse_level(item, ladder, j)
    if not isinstance(item, dict) or "arch" not in item:
        raise BadInputError(f"{path}: level {j} must be a LEVEL string or a mapping with `arch`")
    unknown = set(item) - {"arch", "checkpoint", "pretrained", "hf_hub", "name", "keep_patches"}
    if unknown:
        raise BadInputError(f"{path}: level {j}: unknown keys {sorted(unknown)}")
    if sum(k in item for k in ("checkpoint", "pretrained", "hf_hub")) > 1:
        raise BadInputError(f"{path}: level {j}: give one of checkpoint, pretrained, hf_hub")
    if "hf_hub" in item:
        level = f"{models.HF_HUB}{item['hf_hub']}"
    elif "checkpoint" in item:
        ckpt = Path(item["checkpoint"]).expanduser()
        level = f"{item['arch']}={ckpt if ckpt.is_absolute() else path.parent / ckpt}"
    elif "pretrained" in item:
        level = f"{item['arch']}@{item['pretrained']}"
    else:
        level = item["arch"]
    if "keep_patches" in item:
        level += f"{patches.SYNTAX}{item['keep_patches']}"
    spec = parse_level(level, ladder, j)
    return replace(spec, name=item.get("name", spec.name))


@dataclass
class LevelDoc:
    model: str
    arch: str
    gflops: float
    dim: int
    fingerprint: str
    weights: str  # where the weights come from: a checkpoint path, an open_clip tag, a hub repo, random


@dataclass
class LadderDoc:
    """`bicascade ladders add/show --json`."""

    name: str
    levels: list[LevelDoc]
    shared_text_tower: bool
    description: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"ladder {self.name}" + (" (one shared text tower)" if self.shared_text_tower else "")
                 + (f": {self.description}" if self.description else "")]
        lines += [f"  {j}. {lv.model:<40} {lv.arch:<22} {lv.gflops:>9.3f} GFLOPs  dim {lv.dim:<5} {lv.fingerprint}  "
                  f"{lv.weights}" for j, lv in enumerate(self.levels)]
        return "\n".join(lines)


def _weights(spec: models.ModelSpec) -> str:
    kind = kinds.of(spec)
    return (kind.label or kind.weights)(spec)


def describe(name: str, specs: Sequence[models.ModelSpec], shared: bool, description: str = "") -> LadderDoc:
    levels = []
    for spec in specs:
        pp_cfg, dim = models.preprocessing(spec)
        levels.append(LevelDoc(spec.name, spec.arch, round(costs.image_gflops(spec), 4), dim,
                               models.fingerprint(spec, pp_cfg), _weights(spec)))
    return LadderDoc(name, levels, shared, description)


def add(name: str, specs: Sequence[models.ModelSpec], description: str = "") -> LadderDoc:
    """Validate every level (its weights load into its architecture), then save the ladder."""
    if not name or "/" in name or name.startswith("."):
        raise BadInputError(f"bad ladder name {name!r}")
    if name in {ladder.name for ladder in registry.list_ladders()}:
        raise BadInputError(f"ladder {name!r} exists: `bicascade ladders remove {name}` first, or choose another name")
    if not specs:
        raise BadInputError("a ladder needs at least one level")
    for j, spec in enumerate(specs):
        if spec.seed is not None:
            log.warning("level %d (%s) has random weights: fine for tests, meaningless for search", j, spec.arch)
        models.build_model(spec)  # the weights exist (hub or file) and fit the architecture
    gflops = [costs.image_gflops(s) for s in specs]
    for j in range(1, len(specs)):
        if gflops[j] <= gflops[j - 1]:
            raise BadInputError(f"levels must rise in image cost, cheapest first: level {j} {specs[j].arch} costs "
                                f"{gflops[j]:.3f} GFLOPs, level {j - 1} {specs[j - 1].arch} {gflops[j - 1]:.3f}")
    towers = {models.text_identity(s) for s in specs}
    shared = len(specs) > 1 and len(towers) == 1
    ladder = registry.Ladder(name, tuple(s.name for s in specs), shared_text_tower=shared, description=description)
    registry.save_ladder(ladder, specs)
    return describe(name, specs, shared, description)


def show(name: str) -> LadderDoc:
    ladder = registry.get_ladder(name)
    return describe(name, [registry.get_model(n) for n in ladder.levels], ladder.shared_text_tower, ladder.description)
