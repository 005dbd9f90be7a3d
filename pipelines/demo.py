"""`bicascade demo`: the whole system end to end on the embedded default, one step after another."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bicascade import costs, query, registry
from bicascade.pipelines.ingest import index
from bicascade.pipelines.lab import train
from bicascade.pipelines.measure import evaluate, simulate

log = logging.getLogger("bicascade")


@dataclass
class DemoReport:
    """Each step's own report; `to_json` is the contract: {"db", "index", "eval", "simulate", ...}."""

    db: str
    world: Path
    ladder: str
    index: index.IndexReport
    eval: evaluate.EvalReport
    simulate: simulate.SimReport
    costs: dict[str, costs.CostReport]

    def to_json(self) -> dict:
        return {"db": self.db, "world": str(self.world), "ladder": self.ladder, "index": self.index.to_json(),
                "eval": self.eval.to_json(), "simulate": self.simulate.to_json(),
                "costs": {k: v.to_json() for k, v in self.costs.items()}}

    def format(self) -> str:
        ix = self.index
        parts = [f"world: {self.world}",
                 f"index: {ix.rows} rows in {self.db} ({ix.new_rows} new, {ix.errors} errors) at {ix.images_per_s} "
                 "images/s", f"ladder {self.ladder}:\n" + self.eval.format()]
        parts += [f"{name} (paper's ladder, cost model only)\n{r.format()}" for name, r in self.costs.items()]
        return "\n\n".join(parts + [self.simulate.format()])


def run(workdir: str | Path = "work", ladder: str = train.SYNTHETIC) -> DemoReport:
    """Make the world, train or reuse the ladder (the one step that trains, named explicitly), index the test pool,
    evaluate, replay a short p-small-world stream (serving is the CLI's last step)."""
    workdir = Path(workdir)
    db = str(workdir / "db")
    log.info("step 1/5: the synthetic world and the %s ladder (trained once, then cached)", ladder)
    trained, root = train.ensure_ladder(ladder, workdir / "world")
    log.info("step 2/5: index the test pool with level 0 (Ray Data -> LanceDB; resumable)")
    indexed = index.run_index(str(root / "test"), db, trained.name)
    resolved = query.registered(trained.name)
    log.info("step 3/5: recall per level and per cascade on the held-out test captions")
    recall = evaluate.evaluate(evaluate.world_heldout(root), resolved, db=db)
    log.info("step 4/5: cost model of the paper's ladders (FLOPs counted on the real architectures)")
    paper = {name: costs.cascade_report(costs.ladder_cascades(registry.get_ladder(name).levels))
             for name in ("openclip-vit", "openclip-convnext")}
    log.info("step 5/5: a short p-small-world query stream through the cascade (p = 0.1), with a report")
    sim = simulate.simulate(db, resolved, root, simulate.SimConfig(queries=2000), report_dir=workdir / "report")
    log.info("simulation report: %s/summary.md", sim.report)
    return DemoReport(db, root, trained.name, indexed, recall, sim, paper)
