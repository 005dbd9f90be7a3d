"""`bicascade demo`: the whole system end to end on the embedded default, one step after another."""
from __future__ import annotations

import logging
from pathlib import Path

from bicascade import costs, models

log = logging.getLogger("bicascade")


def run(workdir: str | Path = "work", serve: bool = True) -> dict:
    """Run every step that exists; parts whose issue has not landed are null in the result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("cost model of the paper's ladders (Eq. 1, Eq. 2; FLOPs counted on the real architectures)")
    reports = {name: costs.cascade_report(ladder_cascades(models.get_ladder(name).levels))
               for name in ("openclip-vit", "openclip-convnext")}
    return {"db": None, "costs": reports, "index": None, "eval": None, "simulate": None}


def ladder_cascades(levels: tuple[str, ...]) -> list[list[str]]:
    """Each level alone, every 2-level cascade [level, top], and the full ladder: the rows of the paper's Table 1."""
    return [[lv] for lv in levels] + [[lv, levels[-1]] for lv in levels[:-1]] + [list(levels)]


def format_summary(doc: dict) -> str:
    from bicascade.cli import format_costs

    return "\n\n".join(f"{name}\n{format_costs(r)}" for name, r in doc["costs"].items())
