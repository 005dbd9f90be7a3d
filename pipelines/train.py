"""Train a ladder of OpenCLIP models on the synthetic world (CLIP loss), cached by config hash and resumable."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from bicascade import models
from bicascade.pipelines import world

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


@dataclass(frozen=True)
class Profile:
    """A trainable ladder: model configs (cheapest first), the world they learn from, and the schedule."""

    name: str
    archs: tuple[str, ...]
    world: world.WorldConfig = field(default_factory=world.WorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PROFILES = {
    "synthetic": Profile("synthetic", ("bc-synth-s", "bc-synth-m", "bc-synth-l")),
    "synthetic-tiny": Profile("synthetic-tiny", ("bc-tiny-s", "bc-tiny-m", "bc-tiny-l"), world.tiny(),
                              TrainConfig(samples=4000, batch_size=64)),
    # the MLCE ablation: the default ladder's models and schedule, plus the regulariser
    "synthetic-mlce": Profile("synthetic-mlce", ("bc-synth-s", "bc-synth-m", "bc-synth-l"),
                              train=TrainConfig(mlce_alpha=1.0)),
}
DEFAULT_LADDER = "synthetic"


def level_digest(profile: Profile, arch: str) -> str:
    train = asdict(profile.train)
    if not train["mlce_alpha"]:  # checkpoints trained before the option existed stay valid
        del train["mlce_alpha"], train["mlce_mu"]
    doc = {"arch": open_clip.get_model_config(arch), "world": profile.world.digest(), "train": train}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_pixels(paths: list[str], size: int) -> np.ndarray:
    """Decode a split once into (N, H, W, 3) uint8: training then runs without per-step decoding."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc="decode", unit="img", mininterval=2, leave=False)):
        with Image.open(p) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    return out


def _lr(step: int, steps: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def mlce_loss(img: torch.Tensor, txt: torch.Tensor, mu: float) -> torch.Tensor:
    """AIR's MLCE regulariser on unit features: mean_i KL(softmax(S_t[i] / mu) || softmax(S_v[i] / mu)), S_t and S_v
    the batch's text-text and image-image similarities. It pulls the image tower's neighbourhoods towards the text
    tower's, which a small image tower cannot learn from the contrastive loss alone."""
    log_t = F.log_softmax(txt @ txt.T / mu, dim=1)
    log_v = F.log_softmax(img @ img.T / mu, dim=1)
    return F.kl_div(log_v, log_t, log_target=True, reduction="batchmean")


def train_level(arch: str, pixels: np.ndarray, tokens: torch.Tensor, cfg: TrainConfig, out: Path,
                device: str | None = None, desc: str = "", save_every_s: float = 30.0) -> Path:
    """Train one CLIP model; `out.state` holds resumable state (saved every `save_every_s`) until `out` is written.
    Batches are random: at this budget, batches of whole near-duplicate groups halved validation recall (the
    hard negatives only pay off once coarse features exist)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    dev, _ = models.pick_device(device)  # training stays fp32 (autocast on GPU)
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(arch, pretrained=None).to(dev).train()
    pp = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(pp["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], device=dev).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    steps = cfg.samples // cfg.batch_size
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
        x = torch.from_numpy(pixels[idx]).to(dev).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
        t = tokens[idx, pick].to(dev)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, cfg)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            img, txt, scale = model(x, t)[:3]  # unit features and exp(logit_scale)
            loss = loss_fn(img, txt, scale)
            if cfg.mlce_alpha:
                loss = loss + cfg.mlce_alpha * mlce_loss(img.float(), txt.float(), cfg.mlce_mu)
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
    ckpt_dir = models.cache_dir() / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    targets = [ckpt_dir / f"{a}-{level_digest(profile, a)}.pt" for a in profile.archs]
    with open(ckpt_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer per cache: a second process waits, then reuses the result
        root = None
        if with_world or not all(t.exists() for t in targets):
            root = world.make_world(world_root or models.cache_dir() / "worlds" / profile.world.digest(), profile.world)
            _train_missing(name, profile, root, targets, device)
    specs = [models.ModelSpec(n, a, checkpoint=str(t)) for n, a, t in zip(level_names(profile), profile.archs, targets)]
    ladder = models.Ladder(name, tuple(s.name for s in specs), description=f"trained on world {profile.world.digest()}")
    models.save_ladder(ladder, specs)
    return ladder, root


def _train_missing(name: str, profile: Profile, root: Path, targets: list[Path], device: str | None) -> None:
    if all(t.exists() for t in targets):
        return
    paths, caps = world.load_split(root, "train")
    pixels = load_pixels(paths, profile.world.image_size)
    t0 = time.perf_counter()
    for i, (arch, target) in enumerate(zip(profile.archs, targets)):
        tokens = open_clip.get_tokenizer(arch)([c for cs in caps for c in cs]).view(len(caps), -1, 32)
        train_level(arch, pixels, tokens, profile.train, target, device, desc=f"train {i + 1}/{len(targets)} {arch}")
    log.info("trained ladder %s in %.0f s", name, time.perf_counter() - t0)
