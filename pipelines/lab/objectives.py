"""Training objectives, each owning its losses, its stages and what of it keys a checkpoint: plain CLIP (with AIR's
MLCE regulariser as an option), two-stage distillation from a teacher, and self-pruning (SPDS).
Every loss takes L2-normalised features."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from bicascade import images, models
from bicascade.errors import BadInputError
from bicascade.pipelines.lab import prune

# --- losses -------------------------------------------------------------------------------------------------------

def mlce_loss(img: torch.Tensor, txt: torch.Tensor, mu: float) -> torch.Tensor:
    """AIR's MLCE regulariser: mean_i KL(softmax(S_t[i] / mu) || softmax(S_v[i] / mu)), S_t and S_v the batch's
    text-text and image-image similarities. It pulls the image tower's neighbourhoods towards the text tower's,
    which a small image tower cannot learn from the contrastive loss alone."""
    log_t = F.log_softmax(txt @ txt.T / mu, dim=1)
    log_v = F.log_softmax(img @ img.T / mu, dim=1)
    return F.kl_div(log_v, log_t, log_target=True, reduction="batchmean")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distillation stage 1: cosine distance to the teacher's image embedding (needs no captions)."""
    return (1 - (student * teacher).sum(dim=1)).mean()


def aligned_kd_loss(student_img: torch.Tensor, teacher_img: torch.Tensor, teacher_txt: torch.Tensor, scale: float,
                    kd_weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Distillation stage 2: the student's contrastive loss against the teacher's frozen text embeddings, plus the KL
    divergence from the teacher's image-text similarity distribution to the student's, image->text and
    text->image: the student keeps the teacher's text space, so both share one text tower."""
    logits = scale * student_img @ teacher_txt.T
    labels = torch.arange(len(logits), device=logits.device)
    contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return contrastive + kd_weight * similarity_kl(logits, scale * teacher_img @ teacher_txt.T, temperature)


def self_distillation_loss(prefix_img: torch.Tensor, final_img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """SPDS's L_sd: a prefix of the image tower learns the full model's image-text similarity distribution (a target
    without gradient), image->text and text->image."""
    return similarity_kl(scale * prefix_img @ txt.T, (scale * final_img @ txt.T).detach(), temperature)


def similarity_kl(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)) over rows and over columns, averaged (Hinton's T^2 scaling)."""
    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                        reduction="batchmean") * temperature ** 2

    return (kl(logits, target) + kl(logits.T, target.T)) / 2


# --- what the objectives learn from ----------------------------------------------------------------------------------

@dataclass
class TrainData:
    """A split decoded once into (N, H, W, 3) uint8 and its captions (images i * group to i * group + group - 1 are
    one group of near-duplicates); each model's input size, tokens and teacher embeddings on first use."""

    pixels: np.ndarray
    captions: list[list[str]]
    group: int = 1
    _sized: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)
    _tokens: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _teachers: dict[str, Teacher] = field(default_factory=dict, repr=False)

    def pixels_for(self, prep: images.Preprocessor) -> np.ndarray:
        """The split as `prep` crops it (resize + centre crop to the model's input size), as at index time."""
        if prep.size == self.pixels.shape[1:3]:
            return self.pixels
        if prep.size not in self._sized:
            self._sized[prep.size] = np.stack([prep.crop(Image.fromarray(px)) for px in self.pixels])
        return self._sized[prep.size]

    def tokens(self, arch: str) -> torch.Tensor:
        """(N, captions, context) tokens of `arch`'s tokenizer."""
        if arch not in self._tokens:
            flat = [c for cs in self.captions for c in cs]
            self._tokens[arch] = open_clip.get_tokenizer(arch)(flat).view(len(self.captions), -1, 32)
        return self._tokens[arch]

    def teacher(self, spec: models.ModelSpec, device: str | None) -> Teacher:
        if spec.name not in self._teachers:
            self._teachers[spec.name] = Teacher.embed(spec, self, device)
        return self._teachers[spec.name]


@dataclass
class Batch:
    x: torch.Tensor  # normalised pixels on the training device
    idx: np.ndarray  # image indices into the split
    pick: np.ndarray  # which caption of each image
    tokens: torch.Tensor  # (B, context) of the picked captions


def preprocessor(model: torch.nn.Module) -> images.Preprocessor:
    """The model's preprocessing, as at index time: `.normalize(uint8 batch)` is its input."""
    return images.Preprocessor(open_clip.get_model_preprocess_cfg(model))


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
    def embed(cls, spec: models.ModelSpec, data: TrainData, device: str | None = None, batch: int = 512) -> Teacher:
        dev, _ = models.pick_device(device)
        model = models.load_model(spec, device=str(dev)).model.float()
        prep = preprocessor(model)
        pixels, tokens = data.pixels_for(prep), data.tokens(spec.arch)
        image = torch.cat([F.normalize(model.encode_image(prep.normalize(pixels[i:i + batch]).to(dev)), dim=-1).cpu()
                           for i in tqdm(range(0, len(pixels), batch), desc=f"teacher {spec.name} images",
                                         leave=False)])
        flat = tokens.reshape(-1, tokens.shape[-1])
        text = torch.cat([F.normalize(model.encode_text(flat[i:i + batch].to(dev)), dim=-1).cpu()
                          for i in range(0, len(flat), batch)]).view(*tokens.shape[:2], -1)
        tower = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("visual.")}
        return cls(image, text, tower, float(model.logit_scale.exp()))

    def adopt(self, student: torch.nn.Module) -> None:
        """Give the student the teacher's text tower and logit scale, frozen: only its image tower trains."""
        theirs = student.state_dict()
        wrong = sorted(k for k, v in self.text_tower.items() if k in theirs and theirs[k].shape != v.shape)
        missing = sorted(k for k in theirs if not k.startswith("visual.") and k not in self.text_tower)
        unexpected = sorted(k for k in self.text_tower if k not in theirs)
        if wrong or missing or unexpected:
            raise BadInputError(f"the student's text tower differs from the teacher's: other shapes {wrong[:5]}, "
                                f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        student.load_state_dict(self.text_tower, strict=False)
        for name, p in student.named_parameters():
            p.requires_grad_(name.startswith("visual."))


@dataclass(frozen=True)
class Context:
    """What an objective needs beyond its own config: the ladder's teacher, the prefix depths, the device."""

    teacher: models.ModelSpec | None = None
    prefixes: tuple[int, ...] = ()
    device: str | None = None


LossFn = Callable[[Batch, int], torch.Tensor]  # (batch, stage) -> loss


class Objective(Protocol):
    """How a model learns: the stages of its schedule (each with its own warm-up and decay), the fields of it that
    key a checkpoint, and the loss of a batch once bound to the model being trained."""

    @property
    def stages(self) -> tuple[float, ...]: ...  # cumulative fractions of the samples, ending at 1.0

    def digest(self) -> dict: ...

    def bind(self, model: torch.nn.Module, data: TrainData, ctx: Context) -> LossFn: ...


# --- the objectives ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """open_clip's contrastive CLIP loss; with `mlce_alpha` > 0 plus AIR's MLCE regulariser on the image tower."""

    mlce_alpha: float = 0.0
    mlce_mu: float = 0.1  # MLCE's softmax temperature
    stages: tuple[float, ...] = (1.0,)

    def digest(self) -> dict:
        return {"mlce_alpha": self.mlce_alpha, "mlce_mu": self.mlce_mu} if self.mlce_alpha else {}

    def bind(self, model: torch.nn.Module, data: TrainData, ctx: Context) -> LossFn:
        clip = open_clip.ClipLoss()

        def loss(b: Batch, stage: int) -> torch.Tensor:
            txt = F.normalize(model.encode_text(b.tokens), dim=-1)
            img = F.normalize(model.encode_image(b.x), dim=-1)
            out = clip(img, txt, model.logit_scale.exp())
            if self.mlce_alpha:
                out = out + self.mlce_alpha * mlce_loss(img.float(), txt.float(), self.mlce_mu)
            return out
        return loss


@dataclass(frozen=True)
class Distill:
    """Two-stage distillation of a teacher's image tower into the student's (which takes over the teacher's text
    tower): stage 1 matches the teacher's image embeddings, stage 2 adds its contrastive loss and the KL of
    similarity distributions."""

    stage1: float = 0.5  # the fraction of samples spent matching the teacher's image embeddings
    kd_weight: float = 1.0  # stage 2: weight of the similarity-distribution KL
    kd_temperature: float = 1.0

    @property
    def stages(self) -> tuple[float, ...]:
        return (self.stage1, 1.0)

    def digest(self) -> dict:
        return {"stage1": self.stage1, "kd_weight": self.kd_weight, "kd_temperature": self.kd_temperature}

    def bind(self, model: torch.nn.Module, data: TrainData, ctx: Context) -> LossFn:
        if ctx.teacher is None:
            raise BadInputError("distillation needs a teacher")
        teacher = data.teacher(ctx.teacher, ctx.device)
        teacher.adopt(model)

        def loss(b: Batch, stage: int) -> torch.Tensor:
            img = F.normalize(model.encode_image(b.x), dim=-1)
            target = teacher.image[torch.as_tensor(b.idx)].to(b.x.device)
            if stage == 0:
                return feature_loss(img, target)
            text = teacher.text[torch.as_tensor(b.idx), torch.as_tensor(b.pick)].to(b.x.device)
            return aligned_kd_loss(img, target, text, teacher.scale, self.kd_weight, self.kd_temperature)
        return loss


@dataclass(frozen=True)
class SelfPruning:
    """SPDS: the image tower's first K blocks (for each prefix depth) are trained to be CLIP image towers too, each
    with its own contrastive loss plus `sd_weight` times its self-distillation from the full model."""

    sd_weight: float = 1.0  # eta
    stages: tuple[float, ...] = (1.0,)

    def digest(self) -> dict:
        return {"sd_weight": self.sd_weight}

    def bind(self, model: torch.nn.Module, data: TrainData, ctx: Context) -> LossFn:
        clip = open_clip.ClipLoss()

        def loss(b: Batch, stage: int) -> torch.Tensor:
            txt = F.normalize(model.encode_text(b.tokens), dim=-1)
            scale = model.logit_scale.exp()
            img, *light = [F.normalize(f, dim=-1) for f in reversed(prune.heads(model.visual, b.x, ctx.prefixes))]
            out = clip(img, txt, scale)
            for f in light:
                out = out + clip(f, txt, scale) + self.sd_weight * self_distillation_loss(f, img, txt, scale)
            return out
        return loss
