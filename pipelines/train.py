"""Train a ladder of OpenCLIP models on the synthetic world (CLIP loss), or distil cheap levels from a trained ladder's
top model (two-stage distillation); cached by config hash and resumable."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from bicascade import models
from bicascade.pipelines import losses, prune, world

log = logging.getLogger("bicascade")


@dataclass(frozen=True)
class TrainConfig:
    samples: int = 60000  # per level: every level sees the same number of samples, not the same wall-clock time
    batch_size: int = 128
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.05
    seed: int = 0
    mlce_alpha: float = 0.0  # weight of AIR's MLCE regulariser (0: plain CLIP loss)
    mlce_mu: float = 0.1  # its softmax temperature
    stage1: float = 0.5  # distillation: the fraction of samples spent matching the teacher's image embeddings
    kd_weight: float = 1.0  # distillation stage 2: weight of the similarity-distribution KL
    kd_temperature: float = 1.0
    sd_weight: float = 1.0  # self-pruning: weight (eta) of each prefix's self-distillation from the full model


@dataclass(frozen=True)
class Profile:
    """A trainable ladder: model configs (cheapest first), the world they learn from, and the schedule."""

    name: str
    archs: tuple[str, ...]
    world: world.WorldConfig = field(default_factory=world.WorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: str | None = None  # a profile whose top level the archs are distilled from; they share its text tower
    self_pruning: bool = False  # train only the top ViT, with SPDS; the other archs are its prefixes (fewer blocks)
    start_from: str | None = None  # a profile whose level of the same arch each model (self-pruning: the top) starts from


PROFILES = {
    "synthetic": Profile("synthetic", ("bc-synth-s", "bc-synth-m", "bc-synth-l")),
    "synthetic-tiny": Profile("synthetic-tiny", ("bc-tiny-s", "bc-tiny-m", "bc-tiny-l"), world.tiny(),
                              TrainConfig(samples=4000, batch_size=64)),
    # ViTs trained independently at depths 2, 4 and 6: what self-pruning's prefixes of one model are measured against
    "synthetic-vit": Profile("synthetic-vit", ("bc-synth-vit-d2", "bc-synth-vit-d4", "bc-synth-vit-d6")),
    # self-pruning: synthetic-vit's 6-block ViT trained on with SPDS, so that its first 2 and 4 blocks are levels too
    # (from random weights, the same 60,000 samples gave a full model at half the independent one's R@1)
    "synthetic-spds": Profile("synthetic-spds", ("bc-synth-vit-d2", "bc-synth-vit-d4", "bc-synth-vit-d6"),
                              self_pruning=True, start_from="synthetic-vit"),
    # the control for synthetic-spds: the independent ViTs of depths 2 and 6 trained on for the same 60,000 samples
    "synthetic-vit-continued": Profile("synthetic-vit-continued", ("bc-synth-vit-d2", "bc-synth-vit-d6"),
                                       start_from="synthetic-vit"),
    "synthetic-spds-scratch": Profile("synthetic-spds-scratch", ("bc-synth-vit-d2", "bc-synth-vit-d4",
                                                                 "bc-synth-vit-d6"), self_pruning=True),
    # the MLCE ablation on the cheapest level, where a small image tower should gain most: same arch and schedule
    "synthetic-mlce": Profile("synthetic-mlce", ("bc-synth-s",), train=TrainConfig(mlce_alpha=1.0)),
    # two-stage distillation of the default ladder's top model into image towers of the s and m levels' cost,
    # starting from those levels (from scratch, the same 60,000 samples gave students below the independent levels)
    "synthetic-distilled": Profile("synthetic-distilled", ("bc-synth-s", "bc-synth-m"),
                                   teacher="synthetic", start_from="synthetic"),
    "synthetic-distilled-scratch": Profile("synthetic-distilled-scratch", ("bc-synth-s", "bc-synth-m"),
                                           teacher="synthetic"),
    "synthetic-tiny-distilled": Profile("synthetic-tiny-distilled", ("bc-tiny-s", "bc-tiny-m"), world.tiny(),
                                        TrainConfig(samples=4000, batch_size=64), teacher="synthetic-tiny"),
    "synthetic-tiny-spds": Profile("synthetic-tiny-spds", ("bc-tiny-vit-d1", "bc-tiny-vit-d2"), world.tiny(),
                                   TrainConfig(samples=4000, batch_size=64), self_pruning=True),
}
DEFAULT_LADDER = "synthetic"


def level_digest(profile: Profile, arch: str, teacher: models.ModelSpec | None = None,
                 init: models.ModelSpec | None = None) -> str:
    train = asdict(profile.train)
    if not train["mlce_alpha"]:  # checkpoints trained before an option existed stay valid
        del train["mlce_alpha"], train["mlce_mu"]
    if teacher is None:
        del train["stage1"], train["kd_weight"], train["kd_temperature"]
    if not profile.self_pruning:
        del train["sd_weight"]
    doc = {"arch": open_clip.get_model_config(arch), "world": profile.world.digest(), "train": train}
    if profile.self_pruning:
        doc["prefixes"] = prune.depths(profile.archs)
    if teacher is not None:
        doc["teacher"] = models.weights_identity(teacher)
    if init is not None:
        doc["init"] = models.weights_identity(init)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_pixels(paths: list[str], size: int) -> np.ndarray:
    """Decode a split once into (N, H, W, 3) uint8: training then runs without per-step decoding."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc="decode", unit="img", mininterval=2, leave=False)):
        with Image.open(p) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    return out


def normaliser(model: torch.nn.Module, dev: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """(B, H, W, 3) uint8 -> the model's normalised (B, 3, H, W) input on `dev`."""
    pp = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(pp["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], device=dev).view(1, 3, 1, 1)
    return lambda px: torch.from_numpy(px).to(dev).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)


@dataclass
class Teacher:
    """What distillation learns from, computed once: the teacher's unit embeddings of every training image and caption,
    and its text tower with its logit scale, which students take over frozen (so a cascade needs one text embedding)."""

    image: torch.Tensor  # (N, D)
    text: torch.Tensor  # (N, captions, D)
    text_tower: dict[str, torch.Tensor]
    scale: float

    @classmethod
    @torch.no_grad()
    def embed(cls, spec: models.ModelSpec, pixels: np.ndarray, tokens: torch.Tensor, device: str | None = None,
              batch: int = 512) -> Teacher:
        dev, _ = models.pick_device(device)
        model = models.load_model(spec, device=str(dev)).model.float()
        norm = normaliser(model, dev)
        image = torch.cat([F.normalize(model.encode_image(norm(pixels[i:i + batch])), dim=-1).cpu()
                           for i in tqdm(range(0, len(pixels), batch), desc=f"teacher {spec.name} images", leave=False)])
        flat = tokens.reshape(-1, tokens.shape[-1])
        text = torch.cat([F.normalize(model.encode_text(flat[i:i + batch].to(dev)), dim=-1).cpu()
                          for i in range(0, len(flat), batch)]).view(*tokens.shape[:2], -1)
        tower = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("visual.")}
        return cls(image, text, tower, float(model.logit_scale.exp()))

    def adopt(self, student: torch.nn.Module) -> None:
        """Give the student the teacher's text tower and logit scale, frozen: only its image tower trains."""
        missing, unexpected = student.load_state_dict(self.text_tower, strict=False)
        if unexpected or any(not k.startswith("visual.") for k in missing):
            raise ValueError(f"the student's text tower differs from the teacher's: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, p in student.named_parameters():
            p.requires_grad_(name.startswith("visual."))

    def loss(self, student: torch.nn.Module, x: torch.Tensor, idx: np.ndarray, pick: np.ndarray, stage: int,
             cfg: TrainConfig) -> torch.Tensor:
        img = F.normalize(student.encode_image(x), dim=-1)
        target = self.image[torch.as_tensor(idx)].to(x.device)
        if stage == 0:
            return losses.feature_loss(img, target)
        text = self.text[torch.as_tensor(idx), torch.as_tensor(pick)].to(x.device)
        return losses.aligned_kd_loss(img, target, text, self.scale, cfg.kd_weight, cfg.kd_temperature)


def _lr(step: int, steps: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_level(arch: str, pixels: np.ndarray, tokens: torch.Tensor, cfg: TrainConfig, out: Path,
                device: str | None = None, desc: str = "", save_every_s: float = 30.0,
                teacher: Teacher | None = None, init: models.ModelSpec | None = None,
                prefixes: tuple[int, ...] = ()) -> Path:
    """Train one CLIP model, or with a `teacher` distil its image tower in two stages (each with its own warm-up and
    decay), or with `prefixes` train a ViT whose first K blocks are CLIP image towers too (SPDS: each prefix adds a
    contrastive loss and a self-distillation loss from the full model); `out.state` holds resumable state (saved
    every `save_every_s`) until `out` is written.
    Batches are random: at this budget, batches of whole near-duplicate groups halved validation recall (the
    hard negatives only pay off once coarse features exist)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    dev, _ = models.pick_device(device)  # training stays fp32 (autocast on GPU)
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(arch, pretrained=None).to(dev).train()
    if init is not None:  # a student's text tower is then replaced by its teacher's
        model.load_state_dict(models.read_state_dict(init.checkpoint))
    if teacher is not None:
        teacher.adopt(model)
    norm = normaliser(model, dev)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    steps = cfg.samples // cfg.batch_size
    bounds = [0, int(cfg.stage1 * steps), steps] if teacher is not None else [0, steps]  # stage boundaries
    state_path = out.with_suffix(".state")
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        log.info("resuming %s at step %d/%d", arch, step, steps)
    n = len(pixels)
    per_epoch = n // cfg.batch_size
    bar = tqdm(total=steps, initial=step, desc=desc or arch, unit="step", mininterval=1)
    last_save = time.monotonic()
    while step < steps:
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)  # deterministic: resume sees the same data
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        pick = np.random.default_rng([cfg.seed, step, 1]).integers(tokens.shape[1], size=len(idx))
        x = norm(pixels[idx])
        stage = max(i for i, b in enumerate(bounds[:-1]) if b <= step)
        for g in opt.param_groups:
            g["lr"] = _lr(step - bounds[stage], bounds[stage + 1] - bounds[stage], cfg)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if teacher is not None:
                loss = teacher.loss(model, x, idx, pick, stage, cfg)
            else:
                txt = F.normalize(model.encode_text(tokens[idx, pick].to(dev)), dim=-1)
                scale = model.logit_scale.exp()
                feats = prune.heads(model.visual, x, prefixes) if prefixes else [model.encode_image(x)]
                img, *light = [F.normalize(f, dim=-1) for f in reversed(feats)]  # the full model's first
                loss = loss_fn(img, txt, scale)
                if cfg.mlce_alpha:
                    loss = loss + cfg.mlce_alpha * losses.mlce_loss(img.float(), txt.float(), cfg.mlce_mu)
                for f in light:
                    loss = loss + loss_fn(f, txt, scale) + cfg.sd_weight * losses.self_distillation_loss(f, img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
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


def level_names(profile: Profile) -> list[str]:
    return [f"{profile.name}-{a.split('-')[-1]}" for a in profile.archs]


def ensure_ladder(name: str = DEFAULT_LADDER, world_root: str | Path | None = None, device: str | None = None,
                  with_world: bool = True) -> tuple[models.Ladder, Path | None]:
    """The trained ladder `name` and its world: reuse cached checkpoints, train what is missing. With
    `with_world=False` a fully cached ladder comes back without (re)writing its world (root None)."""
    if name not in PROFILES:
        return models.get_ladder(name), Path(world_root) if world_root else None
    profile = PROFILES[name]
    others = dict.fromkeys(filter(None, (profile.teacher, profile.start_from)))
    for other in others:
        if PROFILES[other].world != profile.world:
            raise ValueError(f"{name} must learn from {other}'s world")
    for other in others:  # once per ladder, when the teacher is also the start (synthetic-distilled)
        trained = ensure_ladder(other, world_root, device, with_world=False)[0]
        others[other] = [models.get_model(n) for n in trained.levels]
    teacher = others[profile.teacher][-1] if profile.teacher else None
    inits = ([next(s for s in others[profile.start_from] if s.arch == a) for a in profile.archs] if profile.start_from
             else [None] * len(profile.archs))
    ckpt_dir = models.cache_dir() / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if profile.self_pruning:  # every prefix is named by the digest of the one model it is cut from
        digest = level_digest(profile, profile.archs[-1], init=inits[-1])
        targets = [ckpt_dir / f"{a}-{digest}.pt" for a in profile.archs]
    else:
        targets = [ckpt_dir / f"{a}-{level_digest(profile, a, teacher, i)}.pt" for a, i in zip(profile.archs, inits)]
    with open(ckpt_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer per cache: a second process waits, then reuses the result
        root = None
        if with_world or not all(t.exists() for t in targets):
            root = world.make_world(world_root or models.cache_dir() / "worlds" / profile.world.digest(), profile.world)
            _train_missing(name, profile, root, targets, device, teacher, inits)
    specs = [models.ModelSpec(n, a, checkpoint=str(t)) for n, a, t in zip(level_names(profile), profile.archs, targets)]
    about = f"trained on world {profile.world.digest()}"
    if teacher is not None:  # the students, then the teacher itself: one text tower for the whole cascade
        specs.append(teacher)
        about = f"distilled from {teacher.name}, whose text tower every level shares; world {profile.world.digest()}"
    if profile.self_pruning:
        about = (f"prefixes of {', '.join(map(str, prune.depths(profile.archs)))} blocks of {profile.archs[-1]} "
                 f"(self-pruning), one text tower; world {profile.world.digest()}")
    ladder = models.Ladder(name, tuple(s.name for s in specs), shared_text_tower=teacher is not None or profile.self_pruning,
                           description=about)
    models.save_ladder(ladder, specs)
    return ladder, root


def _train_missing(name: str, profile: Profile, root: Path, targets: list[Path], device: str | None,
                   teacher: models.ModelSpec | None, inits: list[models.ModelSpec | None]) -> None:
    if all(t.exists() for t in targets):
        return
    depths = prune.depths(profile.archs) if profile.self_pruning else ()
    if not (profile.self_pruning and targets[-1].exists()):  # else only prefixes are missing: cut them again
        paths, caps = world.load_split(root, "train")
        pixels = load_pixels(paths, profile.world.image_size)
        t0 = time.perf_counter()
        tokenize = lambda arch: open_clip.get_tokenizer(arch)([c for cs in caps for c in cs]).view(len(caps), -1, 32)  # noqa: E731
        if profile.self_pruning:  # one model to train; its prefixes are cut from it
            train_level(profile.archs[-1], pixels, tokenize(profile.archs[-1]), profile.train, targets[-1], device,
                        desc=f"train {profile.archs[-1]} with prefixes", init=inits[-1], prefixes=depths)
        else:
            targets_of = Teacher.embed(teacher, pixels, tokenize(teacher.arch), device) if teacher is not None else None
            verb = "distil" if teacher is not None else "train"
            for i, (arch, target, init) in enumerate(zip(profile.archs, targets, inits)):
                train_level(arch, pixels, tokenize(arch), profile.train, target, device,
                            desc=f"{verb} {i + 1}/{len(targets)} {arch}", teacher=targets_of, init=init)
        log.info("trained ladder %s in %.0f s", name, time.perf_counter() - t0)
    if profile.self_pruning:
        for depth, target in zip(depths, targets):
            prune.derive(targets[-1], depth, target)
