"""`bicascade demo`: the whole system end to end on the embedded default, one step after another."""
from __future__ import annotations

import logging
from pathlib import Path

from bicascade import costs, models
from bicascade.pipelines import evaluate, index, report, simulate, train

log = logging.getLogger("bicascade")


def run(workdir: str | Path = "work", ladder: str = train.DEFAULT_LADDER) -> dict:
    """Make the world, train or reuse the ladder, index the test pool, evaluate, replay a short p-small-world stream
    (serving is the CLI's last step)."""
    workdir = Path(workdir)
    db = str(workdir / "db")
    log.info("step 1/5: the synthetic world and the %s ladder (cached after the first run)", ladder)
    trained, root = train.ensure_ladder(ladder, workdir / "world")
    log.info("step 2/5: index the test pool with level 0 (Ray Data -> LanceDB; resumable)")
    indexed = index.run_index(str(root / "test"), db, trained.name)
    log.info("step 3/5: recall per level and per cascade on the held-out test captions")
    recall = evaluate.evaluate(root, trained, db=db)
    log.info("step 4/5: cost model of the paper's ladders (FLOPs counted on the real architectures)")
    paper = {name: costs.cascade_report(ladder_cascades(models.get_ladder(name).levels))
             for name in ("openclip-vit", "openclip-convnext")}
    log.info("step 5/5: a short p-small-world query stream through the cascade (p = 0.1), with a report")
    sim = simulate.simulate(db, trained.name, simulate.SimConfig(queries=2000), world_root=root,
                            report_dir=workdir / "report")
    log.info("simulation report: %s/summary.md", sim["report"])
    return {"db": db, "world": str(root), "ladder": trained.name, "index": indexed, "eval": recall,
            "simulate": sim, "costs": paper}


def ladder_cascades(levels: tuple[str, ...]) -> list[list[str]]:
    """Each level alone, every 2-level cascade [level, top], and the full ladder: the rows of the paper's Table 1."""
    return [[lv] for lv in levels] + [[lv, levels[-1]] for lv in levels[:-1]] + [list(levels)]


def format_summary(doc: dict) -> str:
    from bicascade.cli import format_costs

    ix = doc["index"]
    parts = [f"world: {doc['world']}",
             f"index: {ix['rows']} rows in {doc['db']} ({ix['new_rows']} new, {ix['errors']} errors) "
             f"at {ix['images_per_s']} images/s",
             f"ladder {doc['ladder']}:\n" + evaluate.format_table(doc["eval"])]
    parts += [f"{name} (paper's ladder, cost model only)\n{format_costs(r)}" for name, r in doc["costs"].items()]
    parts.append(report.summary(doc["simulate"]) + f"\nreport (plots, summary.md): {doc['simulate']['report']}")
    return "\n\n".join(parts)
