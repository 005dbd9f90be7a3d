"""Models: creating open_clip architectures, the built-in level kinds (checkpoints, pretrained tags, hf-hub, seeded
random weights; keep-patches is `bicascade.patches`'), loading for inference, devices and fingerprints. The
registries of models and ladders are `bicascade.registry`'s."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from bicascade import kinds
from bicascade.errors import MissingWeightsError, UnknownNameError
from bicascade.images import Preprocessor
from bicascade.levels import HF_HUB, ModelSpec  # the registry's entries; `models.ModelSpec` is the public name
from bicascade.registry import CONFIG_DIR, get_model

open_clip.add_model_config(CONFIG_DIR)  # the project's own architectures (tiny synthetic ladder, tests)


# checkpoints shipped with the source (the default ladder's): a fresh clone's demo reuses them instead of training
WEIGHTS_DIR = Path(__file__).parent / "weights"


def pick_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """GPU with bf16 (fp16 on older cards) when present, else CPU fp32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


@lru_cache(maxsize=64)
def model_config(arch: str) -> dict:
    """open_clip's architecture config; for `hf-hub:` models it is fetched from the hub (once per process)."""
    if arch.startswith(HF_HUB):
        try:
            with _offline_unless_reachable():
                return open_clip.factory._get_hf_config(arch[len(HF_HUB):])["model_cfg"]
        except Exception as e:  # offline, or no such repository
            raise MissingWeightsError(f"cannot read {arch} from the model hub ({type(e).__name__}); without a hub, "
                                      f"use a local checkpoint: ARCH=PATH") from None
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise UnknownNameError(f"open_clip has no architecture {arch!r}")
    return cfg


def image_size(arch: str) -> int:
    size = model_config(arch)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly": we load the weights right after."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:  # our own error says what failed and what to do
            return not record.getMessage().startswith(("No pretrained weights loaded", "Failed to download"))

    drop = Drop()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers at all (asked once per process): offline, fail in a second, not after retries."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[None]:
    """Without a reachable hub, read only the local cache (no retries), and keep the hub client quiet."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = old or not hub_reachable()  # read at call time by hf_hub_download
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def create(arch: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An architecture with random weights (also on the meta device, for counting)."""
    if arch.startswith(HF_HUB):
        model_config(arch)  # a clear error offline
    with quiet_open_clip():
        return open_clip.create_model(arch, pretrained=None, device=device)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_path(spec: ModelSpec) -> str:
    path = os.path.abspath(spec.checkpoint)
    if not os.path.isfile(path):
        raise MissingWeightsError(f"model {spec.name!r}: checkpoint not found: {path}")
    return path


def weights_identity(spec: ModelSpec) -> str:
    """What the level's weights are, as its fingerprint hashes them (its kind decides)."""
    return kinds.of(spec).weights(spec)


def fingerprint(spec: ModelSpec, preprocess_cfg: dict) -> str:
    """Hash of architecture + weights + preprocessing: changed weights never reuse stale embeddings."""
    kind = kinds.of(spec)
    doc = {"arch": model_config(spec.arch), "weights": kind.weights(spec), "preprocess": preprocess_cfg}
    doc |= kind.hashed(spec) if kind.hashed else {}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tower_digest(sd: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(sd.items()):
        if not key.startswith(("visual.", "logit_")):
            digest.update(key.encode())
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _text_tower_sha256(path: str, size: int, mtime_ns: int) -> str:
    return _tower_digest(read_state_dict(path))


def text_identity(spec: ModelSpec) -> str:
    """Hash of the text tower (architecture and weights, not the image tower): levels with equal identities embed a
    query identically, so a cascade computes that embedding once (distilled levels share their teacher's)."""
    cfg = model_config(spec.arch)
    doc = {"text_cfg": cfg["text_cfg"], "embed_dim": cfg["embed_dim"]}
    if spec.checkpoint:
        path = _checkpoint_path(spec)
        st = os.stat(path)
        doc["weights"] = _text_tower_sha256(path, st.st_size, st.st_mtime_ns)
    else:  # a hub model: its text tower is its own
        doc["weights"] = weights_identity(spec)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_encoders(names: Sequence[str]) -> list[int]:
    """For each level, the index of the first level with the same text tower: a query embeds once per distinct one."""
    ids = [text_identity(get_model(n)) for n in names]
    return [ids.index(i) for i in ids]


@lru_cache(maxsize=64)
def _describe_arch(arch: str) -> tuple[dict, int]:
    with torch.device("meta"):
        model = create(arch, device="meta")
    return open_clip.get_model_preprocess_cfg(model), int(model_config(arch)["embed_dim"])


def preprocessing(spec: ModelSpec) -> tuple[dict, int]:
    """(preprocessing config, embedding dim) without loading weights: what CPU workers need to preprocess."""
    return _describe_arch(spec.arch)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (a plain state dict or an open_clip training checkpoint), tensors only:
    `weights_only=True`, so a checkpoint can never run code."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a shipped token table is sparse: torch checks it on load and says so
            warnings.filterwarnings("ignore", "Validating sparse tensor invariants")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects, or not a torch file at all
        raise MissingWeightsError(f"checkpoint {path} cannot be read safely (weights_only): "
                                  f"{str(e).splitlines()[0][:200]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MissingWeightsError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v.to_dense() if v.is_sparse else v for k, v in sd.items()}


def fit_checkpoint(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Load `spec.checkpoint` into `model`, refusing one made for another architecture."""
    sd = read_state_dict(_checkpoint_path(spec))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise MissingWeightsError(f"checkpoint {spec.checkpoint} does not fit {spec.arch!r}: "
                                  f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}") from None
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise MissingWeightsError(f"checkpoint {spec.checkpoint} does not fit {spec.arch!r}: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The model of `spec` with its weights (fp32, CPU), as its kind builds it."""
    return kinds.of(spec).build(spec)


def preflight(spec: ModelSpec) -> None:
    """Fail here, in one clear line, rather than inside a worker: the weights of `spec` can be had."""
    kind = kinds.of(spec)
    (kind.check or kind.weights)(spec)


# --- the built-in level kinds ------------------------------------------------------------------------------------

def check_arch(arch: str, level: str) -> str:
    """`arch` if open_clip has it (or it is a hub model), else an error naming similar ones."""
    if arch.startswith(HF_HUB) or arch in open_clip.list_models():
        return arch
    near = [a for a in open_clip.list_models() if a.lower().startswith(arch.lower()[:5])][:8]
    raise UnknownNameError(f"level {level!r}: open_clip has no architecture {arch!r}"
                           + (f" (similar: {', '.join(near)})" if near else "; see open_clip.list_models()"))


def _checkpoint_parse(text: str, j: int) -> dict | None:
    if "=" not in text:
        return None
    arch, path = text.split("=", 1)
    return {"arch": check_arch(arch, text), "checkpoint": str(Path(path).expanduser().resolve())}


def _checkpoint_weights(spec: ModelSpec) -> str:
    path = _checkpoint_path(spec)
    st = os.stat(path)
    return "sha256:" + _file_sha256(path, st.st_size, st.st_mtime_ns)


def _checkpoint_build(spec: ModelSpec) -> torch.nn.Module:
    model = create(spec.arch)
    fit_checkpoint(model, spec)
    return model


def _random_build(spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
    return create(spec.arch)


def _pretrained_parse(text: str, j: int) -> dict | None:
    if "@" not in text:
        return None
    arch, tag = text.split("@", 1)
    tags = open_clip.list_pretrained_tags_by_model(check_arch(arch, text))
    if tag not in tags:
        raise UnknownNameError(f"level {text!r}: open_clip knows no pretrained tag {tag!r} for {arch} "
                               f"(known: {', '.join(tags) or 'none'})")
    return {"arch": arch, "pretrained": tag}


def _hub_build(spec: ModelSpec) -> torch.nn.Module:
    """Pretrained tags and hf-hub models: open_clip downloads them, or reads its local cache when offline."""
    hub = spec.arch.startswith(HF_HUB)
    where = spec.arch if hub else f"{spec.arch}@{spec.pretrained}"
    try:
        with quiet_open_clip(), _offline_unless_reachable():
            return open_clip.create_model(spec.arch, pretrained=spec.pretrained, require_pretrained=True)
    except Exception as e:  # offline hub, unknown tag...: say what to do instead
        why = ("the model hub is unreachable from this machine and the weights are not in its local cache"
               if not hub_reachable() else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise MissingWeightsError(f"cannot load pretrained weights {where}: {why}; use a local checkpoint "
                                  f"instead: {'ARCH' if hub else spec.arch}=PATH") from None


def _hub_check(spec: ModelSpec) -> None:
    """Without a reachable hub only a local copy can serve: load it now, so a missing one fails at once."""
    if not hub_reachable():
        build_model(spec)


def _builtin(spec: ModelSpec) -> bool:
    return spec.kind is None


# parsed in this order (the first syntax that matches); a spec's kind is the one whose fields it sets
kinds.register(kinds.Kind(
    "hf-hub", "hf-hub:ORG/REPO", parse=lambda text, j: {"arch": text} if text.startswith(HF_HUB) else None,
    weights=lambda spec: spec.arch, build=_hub_build, check=_hub_check,
    owns=lambda s: _builtin(s) and s.arch.startswith(HF_HUB) and not (s.checkpoint or s.pretrained)
    and s.seed is None))
kinds.register(kinds.Kind(
    "checkpoint", "ARCH=PATH", parse=_checkpoint_parse, weights=_checkpoint_weights, build=_checkpoint_build,
    label=lambda spec: spec.checkpoint, owns=lambda s: _builtin(s) and bool(s.checkpoint)))
kinds.register(kinds.Kind(
    "pretrained", "ARCH@TAG", parse=_pretrained_parse, weights=lambda s: f"open_clip:{s.arch}:{s.pretrained}",
    build=_hub_build, check=_hub_check, label=lambda s: f"open_clip:{s.pretrained}",
    owns=lambda s: _builtin(s) and bool(s.pretrained) and not s.checkpoint and s.seed is None))
kinds.register(kinds.Kind(
    "random", "ARCH", parse=lambda text, j: {"arch": check_arch(text, text), "seed": j},
    weights=lambda s: f"random:{s.seed}", build=_random_build, label=lambda s: f"random (seed {s.seed})",
    owns=lambda s: _builtin(s) and not s.checkpoint and s.seed is not None))
from bicascade import patches  # noqa: E402,F401  the keep-patches kind (it changes a level of the kinds above)


@dataclass
class LoadedModel:
    """A CLIP model ready for inference, with its preprocessing and fingerprint."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Preprocessor
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.dim = int(model_config(self.spec.arch)["embed_dim"])

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Normalised images (B, 3, H, W) -> L2-normalised float32 embeddings (B, D)."""
        if not len(pixels):
            return np.zeros((0, self.dim), np.float32)
        feats = self.model.encode_image(pixels.to(self.device, self.dtype, non_blocking=True))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) from `preprocess.crop` -> embeddings."""
        return self.encode_pixels(self.preprocess.normalize(crops, self.device))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(self.preprocess(images))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit text embeddings; texts longer than the tokenizer's context are truncated, not refused."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        feats = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()


def load_model(name: str | ModelSpec, device: str | None = None, seed: int | None = None) -> LoadedModel:
    """Load a model for inference on the best device (bf16/fp16 on a GPU): see `build_model` for the weights."""
    spec = name if isinstance(name, ModelSpec) else get_model(name)
    if seed is not None and not spec.checkpoint:  # random weights instead of the hub's (costs --measure, tests)
        spec = replace(spec, seed=seed, pretrained=None)
    dev, dtype = pick_device(device)
    model = build_model(spec)
    model.eval().to(device=dev, dtype=dtype)
    pp_cfg = open_clip.get_model_preprocess_cfg(model)
    return LoadedModel(spec=spec, model=model, preprocess=Preprocessor(pp_cfg),
                       tokenizer=open_clip.get_tokenizer(spec.arch), device=dev, dtype=dtype,
                       fingerprint=fingerprint(spec, pp_cfg))


def save_checkpoint(weights: torch.nn.Module | dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a model's (or a) plain state dict, loadable with `weights_only=True`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    sd = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    torch.save({k: v.detach().cpu() for k, v in sd.items()}, tmp)
    tmp.replace(path)
    return path


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads (Ray sets OMP_NUM_THREADS=1 in workers, which starves CPU inference)."""
    if n:
        torch.set_num_threads(max(1, n))
