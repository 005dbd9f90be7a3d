"""Model and ladder registries, loading (open_clip tags or local checkpoints), devices and fingerprints."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # the project's own architectures (tiny synthetic ladder, tests)


class UnknownNameError(KeyError):
    """An unknown model or ladder name; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: an open_clip architecture plus where its weights come from."""

    name: str
    arch: str
    pretrained: str | None = None  # open_clip pretrained tag (needs the model hub)
    checkpoint: str | None = None  # local state-dict file; takes precedence over `pretrained`


@dataclass(frozen=True)
class Ladder:
    """Models of one cascade, cheapest first."""

    name: str
    levels: tuple[str, ...]
    shared_text_tower: bool = False
    description: str = ""


_MODELS: dict[str, ModelSpec] = {}
_LADDERS: dict[str, Ladder] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.arch not in open_clip.list_models():
        raise ValueError(f"model {spec.name!r}: open_clip has no architecture {spec.arch!r}")
    _MODELS[spec.name] = spec
    return spec


def register_ladder(ladder: Ladder) -> Ladder:
    if len(ladder.levels) < 1:
        raise ValueError(f"ladder {ladder.name!r} has no levels")
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
    if name in open_clip.list_models():
        return ModelSpec(name=name, arch=name)
    raise UnknownNameError(f"unknown model {name!r}; registered: {', '.join(sorted(_MODELS))} "
                           f"(or any open_clip architecture: open_clip.list_models())")


def get_ladder(name: str) -> Ladder:
    load_user_ladders()
    if name not in _LADDERS:
        raise UnknownNameError(f"unknown ladder {name!r}; known: {', '.join(sorted(_LADDERS))}")
    return _LADDERS[name]


def list_ladders() -> list[Ladder]:
    load_user_ladders()
    return list(_LADDERS.values())


def cache_dir() -> Path:
    """Where trained checkpoints and derived ladders live ($BICASCADE_CACHE or the user cache)."""
    root = os.environ.get("BICASCADE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bicascade"
    return Path(root)


def ladder_file(name: str) -> Path:
    return cache_dir() / "ladders" / f"{name}.json"


def save_ladder(ladder: Ladder, specs: Sequence[ModelSpec]) -> Path:
    """Register a derived ladder and persist it so later processes (and `bicascade ladders`) see it."""
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
register_ladder(Ladder("openclip-vit", ("ViT-B-16", "ViT-L-14", "ViT-g-14"),
                       description="OpenCLIP ViTs, LAION-2B"))
register_ladder(Ladder("openclip-convnext", ("convnext_base_w", "convnext_large_d", "convnext_xxlarge"),
                       description="OpenCLIP ConvNeXts, LAION-2B"))


def pick_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """GPU with bf16 (fp16 on older cards) when present, else CPU fp32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


def image_size(arch: str) -> int:
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_identity(spec: ModelSpec, seed: int | None = None) -> str:
    if spec.checkpoint:
        st = os.stat(spec.checkpoint)
        return "sha256:" + _file_sha256(os.path.abspath(spec.checkpoint), st.st_size, st.st_mtime_ns)
    if seed is not None:
        return f"random:{seed}"
    if spec.pretrained:
        return f"open_clip:{spec.arch}:{spec.pretrained}"
    raise ValueError(f"model {spec.name!r} has neither a checkpoint nor a pretrained tag; "
                     "pass a checkpoint or ask for random weights")


def fingerprint(spec: ModelSpec, preprocess_cfg: dict, seed: int | None = None) -> str:
    """Hash of architecture + weights + preprocessing: changed weights never reuse stale embeddings."""
    doc = {"arch": open_clip.get_model_config(spec.arch), "weights": weights_identity(spec, seed),
           "preprocess": preprocess_cfg}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=64)
def _text_tower_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(read_state_dict(path).items()):
        if not key.startswith(("visual.", "logit_")):
            digest.update(key.encode())
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def text_identity(spec: ModelSpec) -> str:
    """Hash of the text tower (architecture and weights, not the image tower): levels with equal identities embed a
    query identically, so a cascade computes that embedding once (distilled levels share their teacher's)."""
    cfg = open_clip.get_model_config(spec.arch)
    doc = {"text_cfg": cfg["text_cfg"], "embed_dim": cfg["embed_dim"]}
    if spec.checkpoint:
        st = os.stat(spec.checkpoint)
        doc["weights"] = _text_tower_sha256(os.path.abspath(spec.checkpoint), st.st_size, st.st_mtime_ns)
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
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    return open_clip.get_model_preprocess_cfg(model), int(open_clip.get_model_config(arch)["embed_dim"])


def describe(spec: ModelSpec) -> tuple[dict, int]:
    """(preprocessing config, embedding dim) without loading weights: what CPU workers need to preprocess."""
    return _describe_arch(spec.arch)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, tensors only (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@dataclass
class LoadedModel:
    """A CLIP model ready for inference, with its preprocessing and fingerprint."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.dim = int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(open_clip.get_model_config(self.spec.arch)["embed_dim"])

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> L2-normalised float32 embeddings (B, D)."""
        feats = self.model.encode_image(pixels.to(self.device, self.dtype, non_blocking=True))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(torch.stack([self.preprocess(im.convert("RGB")) for im in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        feats = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()


def load_model(name: str | ModelSpec, device: str | None = None, seed: int | None = None) -> LoadedModel:
    """Load a model for inference: its local checkpoint, else its pretrained tag; `seed` gives random weights."""
    spec = name if isinstance(name, ModelSpec) else get_model(name)
    dev, dtype = pick_device(device)
    if seed is not None and not spec.checkpoint:
        torch.manual_seed(seed)
        model = open_clip.create_model(spec.arch, pretrained=None)
    elif spec.checkpoint:
        model = open_clip.create_model(spec.arch, pretrained=None)
        missing, unexpected = model.load_state_dict(read_state_dict(spec.checkpoint), strict=False)
        missing = [k for k in missing if not k.endswith("attn_mask")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {spec.checkpoint} does not fit {spec.arch!r}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    elif spec.pretrained:
        try:
            model = open_clip.create_model(spec.arch, pretrained=spec.pretrained)
        except Exception as e:  # offline hub, missing tag...: say what to do instead
            raise RuntimeError(f"could not load pretrained weights {spec.arch}:{spec.pretrained} ({e}); "
                               "without a model hub, register the model with a local `checkpoint`") from e
    else:
        raise ValueError(f"model {spec.name!r} has no weights: give it a checkpoint or a pretrained tag")
    model.eval().to(device=dev, dtype=dtype)
    pp_cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
    return LoadedModel(spec=spec, model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(spec.arch),
                       device=dev, dtype=dtype, fingerprint=fingerprint(spec, pp_cfg, seed if not spec.checkpoint else None))


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
