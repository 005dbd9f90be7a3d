"""Train a ladder of OpenCLIP models on the synthetic world, distil cheap levels from a trained ladder's top model, or
self-prune one ViT into levels: profiles name what to train, objectives how; checkpoints are cached by a digest of
everything that shapes them and training resumes after a crash."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import open_clip
import torch
from tqdm import tqdm

from bicascade import images, models, registry
from bicascade.errors import BadInputError, MissingWeightsError, UnknownNameError
from bicascade.pipelines.lab import prune, world
from bicascade.pipelines.lab.objectives import (
    Batch,
    Clip,
    Context,
    Distill,
    Objective,
    SelfPruning,
    TrainData,
    preprocessor,
)

log = logging.getLogger("bicascade")


@dataclass(frozen=True)
class Schedule:
    samples: int = 120_000  # per level: every level sees the same number of samples, not the same wall-clock time
    batch_size: int = 128
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.05
    seed: int = 0
    # the share of every batch drawn as whole groups of near-duplicates, hard negatives for each other: a random batch
    # of 128 holds almost none, so its loss falls near 0 long before a model uses the detail that only a larger level
    # can see (at 120,000 samples with a 128-wide text tower the default ladder's top level then tested below its
    # middle one: R@1 0.520 vs 0.546; with half a batch in groups 0.541 vs 0.497; all of a batch, 60,000 samples from
    # random weights: half the validation R@1)
    hard_groups: float = 0.0


@dataclass(frozen=True)
class Profile:
    """A trainable ladder: model configs (cheapest first), the world they learn from, the schedule and objective."""

    name: str
    archs: tuple[str, ...]
    world: world.WorldConfig = field(default_factory=world.WorldConfig)
    schedule: Schedule = field(default_factory=Schedule)
    objective: Clip | Distill | SelfPruning = field(default_factory=Clip)
    teacher: str | None = None  # Distill: the profile whose top level the archs learn from; they share its text tower
    start_from: str | None = None  # a profile whose level of the same arch each model starts from (SPDS: the top)
    keep_patches: tuple[float, ...] = ()  # no training: start_from's top ViT on these fractions of its patches

    @property
    def self_pruning(self) -> bool:
        return isinstance(self.objective, SelfPruning)


TINY = Schedule(samples=4000, batch_size=64)
# the default ladder's: 480,000 samples (47 minutes on 2 CPU cores for the three levels, shipped in bicascade/weights/
# so that a fresh clone does not train); from 240,000 they gained 5-8 points of validation R@1 in the same order
# (bench/curves.py); the ViT and distillation studies keep random batches
DEFAULT = Schedule(samples=480_000, hard_groups=0.5)
VIT = ("bc-synth-vit-d2", "bc-synth-vit-d4", "bc-synth-vit-d6")
PROFILES = {p.name: p for p in [
    Profile("synthetic", ("bc-synth-s", "bc-synth-m", "bc-synth-l"), schedule=DEFAULT),
    Profile("synthetic-tiny", ("bc-tiny-s", "bc-tiny-m", "bc-tiny-l"), world.tiny(), TINY),
    # ViTs trained independently at depths 2, 4 and 6: what self-pruning's prefixes of one model are measured against
    Profile("synthetic-vit", VIT),
    # self-pruning: synthetic-vit's 6-block ViT trained on with SPDS, so that its first 2 and 4 blocks are levels too
    # (from random weights, 60,000 samples gave a full model at half the independent one's R@1, when both had 60,000)
    Profile("synthetic-spds", VIT, objective=SelfPruning(), start_from="synthetic-vit"),
    # the control for synthetic-spds: the independent ViTs of depths 2 and 6 trained on for as many samples again
    Profile("synthetic-vit-continued", (VIT[0], VIT[2]), start_from="synthetic-vit"),
    # a model upgrade to migrate the demo db to: the default ladder's top level trained on for 60,000 more samples
    Profile("synthetic-l-continued", ("bc-synth-l",), start_from="synthetic",
            schedule=replace(DEFAULT, samples=60_000, lr=5e-4)),
    Profile("synthetic-spds-scratch", VIT, objective=SelfPruning()),
    # the MLCE ablation on the cheapest level, where a small image tower should gain most: same arch and schedule
    Profile("synthetic-mlce", ("bc-synth-s",), schedule=DEFAULT, objective=Clip(mlce_alpha=1.0)),
    # two-stage distillation of the default ladder's top model into image towers of the s and m levels' cost,
    # starting from those levels (from scratch, the same 60,000 samples gave students below the independent levels)
    Profile("synthetic-distilled", ("bc-synth-s", "bc-synth-m"), objective=Distill(), teacher="synthetic",
            start_from="synthetic"),
    Profile("synthetic-distilled-scratch", ("bc-synth-s", "bc-synth-m"), objective=Distill(), teacher="synthetic"),
    Profile("synthetic-tiny-distilled", ("bc-tiny-s", "bc-tiny-m"), world.tiny(), TINY, Distill(),
            teacher="synthetic-tiny"),
    Profile("synthetic-tiny-spds", ("bc-tiny-vit-d1", "bc-tiny-vit-d2"), world.tiny(), TINY, SelfPruning()),
    # cheap levels without training: synthetic-vit's 6-block ViT on a fixed quarter and half of its patch tokens
    Profile("synthetic-vit-patches", (VIT[2],), start_from="synthetic-vit", keep_patches=(0.25, 0.5)),
    Profile("synthetic-tiny-patches", ("bc-tiny-vit-d2",), world.tiny(), TINY, start_from="synthetic-tiny-spds",
            keep_patches=(0.5,)),
]}
SYNTHETIC = "synthetic"  # the embedded default's ladder: the demo names it, nothing else falls back to it


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UnknownNameError(f"unknown training profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


def make_command(p: Profile) -> str:
    return f"bicascade {'distill' if p.teacher or p.self_pruning or p.keep_patches else 'train'} --ladder {p.name}"


def level_digest(p: Profile, arch: str, teacher: models.ModelSpec | None = None,
                 init: models.ModelSpec | None = None) -> str:
    """Everything that shapes a checkpoint: architecture, world, schedule, objective, teacher and start weights."""
    doc = {"arch": models.model_config(arch), "world": p.world.digest(),
           "train": asdict(p.schedule) | p.objective.digest()}
    if p.self_pruning:
        doc["prefixes"] = prune.depths(p.archs)
    if teacher is not None:
        doc["teacher"] = models.weights_identity(teacher)
    if init is not None:
        doc["init"] = models.weights_identity(init)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_pixels(paths: list[str], size: int) -> np.ndarray:
    """Decode a split once into (N, H, W, 3) uint8: training then runs without per-step decoding."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc="decode", unit="img", mininterval=2, leave=False)):
        out[i] = images.square_pixels(p, size)
    return out


def load_split(root: Path, split: str, cfg: world.WorldConfig) -> TrainData:
    paths, caps = world.load_split(root, split)
    return TrainData(load_pixels(paths, cfg.image_size), caps, cfg.group)


def _lr(step: int, steps: int, s: Schedule) -> float:
    warm = max(1, int(s.warmup * steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    return 0.5 * s.lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def batch_indices(n: int, group: int, step: int, s: Schedule) -> np.ndarray:
    """Step `step`'s samples, deterministic so that a resumed run sees the same data: an epoch's permutation, with a
    share `s.hard_groups` of the batch given to whole groups of near-duplicates."""
    epoch, k = divmod(step, n // s.batch_size)
    idx = np.random.default_rng([s.seed, epoch]).permutation(n)[k * s.batch_size:(k + 1) * s.batch_size]
    picked = round(s.hard_groups * s.batch_size / group) if group > 1 else 0
    if not picked:
        return idx
    groups = np.random.default_rng([s.seed, step, 2]).choice(n // group, picked, replace=False)
    members = (groups[:, None] * group + np.arange(group)).ravel()
    return np.concatenate([members, idx[~np.isin(idx // group, groups)][:s.batch_size - len(members)]])


def train_level(arch: str, data: TrainData, schedule: Schedule, objective: Objective, out: Path,
                ctx: Context = Context(), desc: str = "", save_every_s: float = 30.0,
                init: models.ModelSpec | None = None,
                callback: Callable[[int, torch.nn.Module], None] | None = None, callback_every: int = 0) -> Path:
    """Train one model with `objective` (each of its stages with its own warm-up and cosine decay); `out.state` holds
    resumable state (saved every `save_every_s`) until `out` is written; `callback(step, model)` every
    `callback_every` steps (learning curves).
    Batches mix random samples with whole groups of near-duplicates (`batch_indices`)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    dev, _ = models.pick_device(ctx.device)  # training stays fp32 (autocast on GPU)
    torch.manual_seed(schedule.seed)
    model = models.create(arch).to(dev).train()
    if init is not None:  # a student's text tower is then replaced by its teacher's
        model.load_state_dict(models.read_state_dict(init.checkpoint))
    loss_fn = objective.bind(model, data, ctx)
    prep = preprocessor(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                             {"params": rest, "weight_decay": 0}], lr=schedule.lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=True)  # one kernel over all tensors: a quarter of a small level's CPU step
    steps = schedule.samples // schedule.batch_size
    bounds = [0] + [int(f * steps) for f in objective.stages]  # stage boundaries in steps
    state_path = out.with_suffix(".state")
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        log.info("resuming %s at step %d/%d", arch, step, steps)
    tokens, pixels = data.tokens(arch), data.pixels_for(prep)
    bar = tqdm(total=steps, initial=step, desc=desc or arch, unit="step", mininterval=1)
    last_save = time.monotonic()
    while step < steps:
        idx = batch_indices(len(pixels), data.group, step, schedule)
        pick = np.random.default_rng([schedule.seed, step, 1]).integers(tokens.shape[1], size=len(idx))
        batch = Batch(prep.normalize(pixels[idx], dev), idx, pick, tokens[idx, pick].to(dev))
        stage = max(i for i, b in enumerate(bounds[:-1]) if b <= step)
        for g in opt.param_groups:
            g["lr"] = _lr(step - bounds[stage], bounds[stage + 1] - bounds[stage], schedule)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = loss_fn(batch, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if callback is not None and callback_every and (step % callback_every == 0 or step == steps):
            callback(step, model)
        if time.monotonic() - last_save > save_every_s and step < steps:
            _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, state_path)
            last_save = time.monotonic()
    bar.close()
    models.save_checkpoint(model, out)
    state_path.unlink(missing_ok=True)
    return out


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def level_names(p: Profile) -> list[str]:
    return [f"{p.name}-{a.split('-')[-1]}" for a in p.archs]


def world_root(p: Profile, root: str | Path | None = None) -> Path:
    """The profile's world, written on first use (deterministic, so every process agrees on it)."""
    return world.make_world(root or registry.cache_dir() / "worlds" / p.world.digest(), p.world)


@dataclass
class Checkpoints:
    """Where a profile's checkpoints go and what they start from or learn from."""

    targets: list[Path]
    teacher: models.ModelSpec | None
    inits: list[models.ModelSpec | None]

    @property
    def ready(self) -> bool:
        return all(t.exists() for t in self.targets)


def checkpoints(p: Profile, others: dict[str, list[models.ModelSpec]]) -> Checkpoints:
    """Checkpoint paths by digest; `others` holds the trained levels of the teacher and start profiles."""
    teacher = others[p.teacher][-1] if p.teacher else None
    inits = ([next(s for s in others[p.start_from] if s.arch == a) for a in p.archs] if p.start_from
             else [None] * len(p.archs))
    if p.self_pruning:  # every prefix is named by the digest of the one model it is cut from
        digest = level_digest(p, p.archs[-1], init=inits[-1])
        return Checkpoints([checkpoint_path(f"{a}-{digest}.pt") for a in p.archs], teacher, inits)
    targets = [checkpoint_path(f"{a}-{level_digest(p, a, teacher, i)}.pt") for a, i in zip(p.archs, inits)]
    return Checkpoints(targets, teacher, inits)


def checkpoint_path(name: str) -> Path:
    """The shipped checkpoint of that name (`models.WEIGHTS_DIR`) when the source has one, else the cache's."""
    shipped = models.WEIGHTS_DIR / name
    return shipped if shipped.exists() else registry.cache_dir() / "checkpoints" / name


def specs_of(p: Profile, planned: Checkpoints) -> tuple[registry.Ladder, list[models.ModelSpec]]:
    specs = [models.ModelSpec(n, a, checkpoint=str(t)) for n, a, t in zip(level_names(p), p.archs, planned.targets)]
    about = f"trained on world {p.world.digest()}"
    if planned.teacher is not None:  # the students, then the teacher itself: one text tower for the whole cascade
        specs.append(planned.teacher)
        about = f"distilled from {planned.teacher.name}, whose text tower every level shares; world {p.world.digest()}"
    if p.self_pruning:
        about = (f"prefixes of {', '.join(map(str, prune.depths(p.archs)))} blocks of {p.archs[-1]} "
                 f"(self-pruning), one text tower; world {p.world.digest()}")
    shared = planned.teacher is not None or p.self_pruning
    return registry.Ladder(p.name, tuple(s.name for s in specs), shared_text_tower=shared, description=about), specs


def ensure_ladder(name: str = SYNTHETIC, world_dir: str | Path | None = None, device: str | None = None,
                  with_world: bool = True) -> tuple[registry.Ladder, Path | None]:
    """Train what profile `name` is missing (its teacher and start profiles first), register its ladder and return it
    with its world. With `with_world=False` a fully trained ladder comes back without writing its world (root None)."""
    p = profile(name)
    if p.keep_patches:
        return patch_ladder(p, world_dir, device, with_world)
    others = {o: [] for o in filter(None, (p.teacher, p.start_from))}
    for other in others:  # once per ladder, when the teacher is also the start (synthetic-distilled)
        if PROFILES[other].world != p.world:
            raise BadInputError(f"{name} must learn from {other}'s world")
        trained = ensure_ladder(other, world_dir, device, with_world=False)[0]
        others[other] = [registry.get_model(n) for n in trained.levels]
    planned = checkpoints(p, others)
    locks = registry.cache_dir() / "checkpoints"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer per cache: a second process waits, then reuses the result
        root = None
        if with_world or not planned.ready:
            root = world_root(p, world_dir)
            _train_missing(p, root, planned, device)
    ladder, specs = specs_of(p, planned)
    registry.save_ladder(ladder, specs)
    return ladder, root


def ship(name: str = SYNTHETIC) -> list[Path]:
    """Train profile `name` if needed and copy its checkpoints into `models.WEIGHTS_DIR` (replacing what was shipped
    before), where a fresh clone finds them instead of training. The token-embedding rows of tokens that no caption of
    the world holds are left out (zeros when loaded): training never reads them (they stay at their random init), every
    caption of the world embeds exactly as before, and the table is stored row-sparse (a sixth of the trained file)."""
    ladder, root = ensure_ladder(name)
    captions = [c for split in ("train", "val", "test") for cs in world.load_split(root, split)[1] for c in cs]
    old = set(models.WEIGHTS_DIR.glob("*.pt"))
    shipped = []
    for spec in map(registry.get_model, ladder.levels):
        sd = models.read_state_dict(spec.checkpoint)
        used = open_clip.get_tokenizer(spec.arch)(captions).unique()
        table = sd["token_embedding.weight"]
        sd["token_embedding.weight"] = torch.sparse_coo_tensor(used[None], table[used], table.shape,
                                                               check_invariants=True).coalesce()
        shipped.append(models.save_checkpoint(sd, models.WEIGHTS_DIR / Path(spec.checkpoint).name))
    for stale in old - set(shipped):
        stale.unlink()
    return shipped


def patch_ladder(p: Profile, world_dir: str | Path | None, device: str | None,
                 with_world: bool) -> tuple[registry.Ladder, Path | None]:
    """Levels made without training: the start profile's top ViT on fixed fractions of its patches, then whole."""
    start, root = ensure_ladder(p.start_from, world_dir, device, with_world)
    top = registry.get_model(start.levels[-1])
    specs = [models.ModelSpec(f"{p.name}-p{round(100 * k)}", top.arch, checkpoint=top.checkpoint, keep_patches=k)
             for k in p.keep_patches] + [top]
    ladder = registry.Ladder(p.name, tuple(s.name for s in specs), shared_text_tower=True,
                           description=f"{top.name} on {', '.join(f'{k:.0%}' for k in p.keep_patches)} of its patch "
                                       "tokens, then all of them; one text tower, no training")
    registry.save_ladder(ladder, specs)
    return ladder, root


def catalog() -> list[dict]:
    """Every profile as `bicascade ladders` lists it: its levels, whether its checkpoints exist, the command."""
    out = []
    for p in PROFILES.values():
        if p.keep_patches:  # nothing of its own to train: ready when its start is
            start = next(c for c in out if c["name"] == p.start_from)
            out.append({"name": p.name, "levels": [f"{p.name}-p{round(100 * k)}" for k in p.keep_patches]
                        + [start["levels"][-1]], "shared_text_tower": True, "kind": "trainable",
                        "ready": start["ready"], "make": make_command(p)})
            continue
        try:
            others = {o: [registry.get_model(n) for n in registry.get_ladder(o).levels]
                      for o in filter(None, (p.teacher, p.start_from))}
            planned = checkpoints(p, others)
            ladder, _ = specs_of(p, planned)
            levels, ready, shared = list(ladder.levels), planned.ready, ladder.shared_text_tower
        except (UnknownNameError, MissingWeightsError, StopIteration):  # its teacher or start is not trained yet
            levels, ready, shared = level_names(p) + ([f"({p.teacher}'s top level)"] if p.teacher else []), False, \
                bool(p.teacher) or p.self_pruning
        out.append({"name": p.name, "levels": levels, "shared_text_tower": shared, "kind": "trainable",
                    "ready": ready, "make": make_command(p)})
    return out


def require_ready(name: str) -> None:
    """A trainable ladder whose checkpoints are missing is an error naming the command that makes them."""
    if name in PROFILES and not next(c for c in catalog() if c["name"] == name)["ready"]:
        raise MissingWeightsError(f"ladder {name!r} is not trained yet: run `{make_command(PROFILES[name])}` "
                                  "(cached afterwards)")


def _train_missing(p: Profile, root: Path, planned: Checkpoints, device: str | None) -> None:
    if planned.ready:
        return
    depths = prune.depths(p.archs) if p.self_pruning else ()
    if not (p.self_pruning and planned.targets[-1].exists()):  # else only prefixes are missing: cut them again
        data = load_split(root, "train", p.world)
        ctx = Context(teacher=planned.teacher, prefixes=depths, device=device)
        t0 = time.perf_counter()
        if p.self_pruning:  # one model to train; its prefixes are cut from it
            train_level(p.archs[-1], data, p.schedule, p.objective, planned.targets[-1], ctx,
                        desc=f"train {p.archs[-1]} with prefixes", init=planned.inits[-1])
        else:
            verb = "distil" if p.teacher else "train"
            for i, (arch, target, init) in enumerate(zip(p.archs, planned.targets, planned.inits)):
                train_level(arch, data, p.schedule, p.objective, target, ctx,
                            desc=f"{verb} {i + 1}/{len(planned.targets)} {arch}", init=init)
        log.info("trained ladder %s in %.0f s", p.name, time.perf_counter() - t0)
    if p.self_pruning:
        for depth, target in zip(depths, planned.targets):
            prune.derive(planned.targets[-1], depth, target)


if __name__ == "__main__":  # `make weights`: what the source ships for the default ladder
    logging.basicConfig(level=logging.INFO)
    print("\n".join(map(str, ship())))
