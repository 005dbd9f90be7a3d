"""Learning curves of a trainable ladder: validation Recall@1/5/10 against samples seen, one cosine run per level to
a long budget, evaluated every `--every` samples on the world's validation split. Writes JSON (and a plot with
`bench/results.py`). Not a test.

    python bench/curves.py [--ladder synthetic] [--samples 480000] [--every 24000] [--hard-groups 0.5]
        [--out bench/results/curves.json]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bicascade import costs, models
from bicascade.pipelines.lab import objectives, train


def val_recall(model: torch.nn.Module, data: objectives.TrainData, arch: str) -> dict[str, float]:
    """Recall@1/5/10 of every validation caption against the validation images."""
    model.eval()
    dev = next(model.parameters()).device
    prep = objectives.preprocessor(model)
    tokens = data.tokens(arch)
    with torch.no_grad():
        pixels = data.pixels_for(prep)
        img = torch.cat([F.normalize(model.encode_image(prep.normalize(pixels[i:i + 256]).to(dev)), dim=-1)
                         for i in range(0, len(pixels), 256)])
        flat = tokens.reshape(-1, tokens.shape[-1])
        txt = torch.cat([F.normalize(model.encode_text(flat[i:i + 1024].to(dev)), dim=-1)
                         for i in range(0, len(flat), 1024)])
    model.train()
    truth = torch.arange(len(data.pixels)).repeat_interleave(tokens.shape[1])
    hit = (txt @ img.T).topk(10, dim=1).indices == truth[:, None]
    return {str(k): float(hit[:, :k].any(1).float().mean()) for k in (1, 5, 10)}


def settings(s: train.Schedule) -> dict:
    """What of a schedule a curve or a shipped end point records (and a rerun is matched on)."""
    return {"samples": s.samples, "lr": s.lr, "batch_size": s.batch_size, "hard_groups": s.hard_groups}


class CurvePoints:
    """The callback of one run: a point per evaluation."""

    def __init__(self, arch: str, val: objectives.TrainData, batch_size: int) -> None:
        self.arch, self.val, self.batch_size = arch, val, batch_size
        self.points: list[dict] = []
        self.t0 = time.perf_counter()

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        self.points.append({"samples": step * self.batch_size, "seconds": round(time.perf_counter() - self.t0, 1),
                            "val_recall": val_recall(model, self.val, self.arch)})
        print(self.arch, self.points[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ladder", default="synthetic")
    ap.add_argument("--samples", type=int, default=480_000)
    ap.add_argument("--every", type=int, default=24_000)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--hard-groups", type=float, default=None, help="share of a batch in near-duplicate groups")
    ap.add_argument("--archs", default=None, help="comma list (default: the profile's)")
    ap.add_argument("--out", default="bench/results/curves.json")
    ap.add_argument("--keep", default=None, help="keep each run's final checkpoint in this folder")
    ap.add_argument("--shipped", action="store_true",
                    help="instead of training: add the trained profile's own checkpoints (its shipped schedule) as "
                         "end points beside the curves")
    args = ap.parse_args()
    p = train.profile(args.ladder)
    overrides = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size), ("hard_groups", args.hard_groups))
                 if v is not None}
    schedule = replace(p.schedule, samples=args.samples, **overrides)
    root = train.world_root(p)
    data = train.load_split(root, "train", p.world)
    val = train.load_split(root, "val", p.world)
    out = Path(args.out)
    fresh = {"ladder": args.ladder, "world": p.world.digest(), "runs": []}
    doc = json.loads(out.read_text()) if out.exists() else fresh
    if args.shipped:
        ladder, _ = train.ensure_ladder(args.ladder, with_world=False)
        doc["shipped"] = []
        for name, arch in zip(ladder.levels, p.archs):
            model = models.load_model(name, device="cpu").model.float()
            doc["shipped"].append({"arch": arch, "model": name, "text_gflops": costs.text_gflops(arch),
                                   **settings(p.schedule),
                                   "val_recall": val_recall(model, val, arch)})
            print(doc["shipped"][-1], flush=True)
        out.write_text(json.dumps(doc, indent=2))
        return
    for arch in args.archs.split(",") if args.archs else p.archs:
        record = CurvePoints(arch, val, schedule.batch_size)
        ckpt = Path(args.keep or "/tmp") / f"curve-{arch}-{schedule.samples}-{schedule.lr}-{schedule.batch_size}.pt"
        ckpt.unlink(missing_ok=True)
        train.train_level(arch, data, schedule, p.objective, ckpt, desc=f"curve {arch}", callback=record,
                          callback_every=max(1, args.every // schedule.batch_size))
        run = {"arch": arch, "text_gflops": costs.text_gflops(arch), **settings(schedule)}
        doc["runs"] = [r for r in doc["runs"] if {k: r.get(k) for k in run} != run]  # a rerun replaces its old curve
        doc["runs"].append(run | {"gflops": costs.image_gflops(arch), "points": record.points})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
        if not args.keep:
            ckpt.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
