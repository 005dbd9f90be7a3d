"""Training objectives beyond open_clip's ClipLoss: AIR's MLCE regulariser, the two stages of distillation and
self-pruning's self-distillation.
Every input is a batch of L2-normalised features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
