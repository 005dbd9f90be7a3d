"""Self-pruning (AIR's SPDS): one ViT trained so that its first K blocks, followed by its final norm and projection,
are a CLIP image encoder too. Each prefix is then an ordinary open_clip model of depth K (an architecture equal to the
full one but for `vision_cfg.layers`): a cheaper level that shares the full model's text tower."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch

from bicascade import models
from bicascade.errors import BadInputError

_BLOCKS = "visual.transformer.resblocks."


def depths(archs: Sequence[str]) -> tuple[int, ...]:
    """The depths of the prefix architectures `archs[:-1]` of the ViT `archs[-1]`, checked to be truncations of it."""
    top = models.model_config(archs[-1])
    if not isinstance(top["vision_cfg"]["layers"], int):
        raise BadInputError(f"self-pruning needs a ViT top model; {archs[-1]} has stages {top['vision_cfg']['layers']}")
    out = []
    for arch in archs[:-1]:
        cfg = models.model_config(arch)
        k = cfg["vision_cfg"]["layers"]
        if {**cfg, "vision_cfg": {**cfg["vision_cfg"], "layers": top["vision_cfg"]["layers"]}} != top:
            raise BadInputError(f"{arch} is not {archs[-1]} with fewer vision blocks")
        out.append(k)
    if out != sorted(set(out)) or (out and out[-1] >= top["vision_cfg"]["layers"]):
        raise BadInputError(f"prefix depths {out} must rise and stay below the full model's "
                            f"{top['vision_cfg']['layers']}")
    return tuple(out)


def heads(visual: torch.nn.Module, x: torch.Tensor, depths: Sequence[int]) -> list[torch.Tensor]:
    """Image features after each of the first `depths` blocks and after the last one, from one pass: each equals what
    the model truncated to that depth computes (its final norm, pooling and projection are the full model's)."""
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or not visual.transformer.batch_first:
        raise BadInputError("self-pruning needs an open_clip VisionTransformer image tower")
    x = visual._embeds(x)
    out = []
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks, 1):
        x = block(x)
        if i in depths or i == len(blocks):
            pooled, _ = visual._pool(x)
            out.append(pooled @ visual.proj if visual.proj is not None else pooled)
    return out


def derive(checkpoint: Path, depth: int, out: Path) -> Path:
    """Write the prefix of `depth` blocks of a trained model as a checkpoint of its own."""
    sd = models.read_state_dict(checkpoint)
    def kept(key: str) -> bool:
        return not (key.startswith(_BLOCKS) and int(key[len(_BLOCKS):].split(".")[0]) >= depth)
    return models.save_checkpoint({k: v for k, v in sd.items() if kept(k)}, out)
