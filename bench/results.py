"""Render docs/RESULTS.md (and its plots under docs/) from the JSON documents under bench/results/: every figure in
it was printed by a command or benchmark of this repository, none is typed by hand. A section appears only when
its JSON exists. Run by `make results`.

    python bench/results.py [--results bench/results] [--out docs]
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Section = Callable[[Path, Path], str | None]


def read_result(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def fmt(x, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def eval_tables(results: Path, out: Path) -> str | None:
    parts = []
    for path in sorted(results.glob("eval_*.json")):
        doc = json.loads(path.read_text())
        rows = ["| level / cascade | m | image GFLOPs | R@1 | R@5 | R@10 | F_life (Eq. 1) |",
                "|---|---|---|---|---|---|---|"]
        for lv in doc["levels"]:
            r = lv["recall"]
            rows.append(f"| {lv['model']} | | {lv['gflops']:.4f} | {r['1']:.3f} | {r['5']:.3f} | {r['10']:.3f} | |")
        for c in doc["cascades"]:
            r = c["recall"]
            rows.append(f"| {' -> '.join(c['cascade'])} | {','.join(map(str, c['m']))} | | {r['1']:.3f} | "
                        f"{r['5']:.3f} | {r['10']:.3f} | {c['f_life']:.2f} |")
        t = doc["text"]
        parts.append(f"`{path.name}`: {doc['queries']} queries over {doc['images']} test images, p = {doc['p']}"
                     + (f", level 0 read from `{doc['db']}`" if doc.get("db") else "") + "; text side: "
                     f"{t['encodes_per_query']} embedding(s) per query, {t['gflops_per_query']:.4f} GFLOPs.\n\n"
                     + "\n".join(rows))
    return "## Recall per level and cascade (`bicascade eval`)\n\n" + "\n\n".join(parts) if parts else None


CHEAP_LEVELS = {  # the eval files compared in one table, and how each ladder's levels were made
    "eval_synthetic-vit.json": "trained on its own (120,000 samples)",
    "eval_synthetic-spds.json": "synthetic-vit-d6 trained on with SPDS (120,000 more samples): its first d blocks",
    "eval_synthetic-vit-patches.json": "synthetic-vit-d6 on a fixed share of its patch tokens, no training",
}


def cheap_levels(results: Path, out: Path) -> str | None:
    rows, seen = ["| level | made as | image GFLOPs | R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|"], set()
    for name, made in CHEAP_LEVELS.items():
        doc = read_result(results / name)
        for lv in doc["levels"] if doc else []:
            if lv["model"] not in seen:
                seen.add(lv["model"])
                r = lv["recall"]
                rows.append(f"| {lv['model']} | {made} | {lv['gflops']:.4f} | {r['1']:.3f} | {r['5']:.3f} | "
                            f"{r['10']:.3f} |")
    if not seen:
        return None
    return ("## Cheap levels of one ViT: independent, self-pruned, patch-dropped (`bicascade eval --ladder ...`)\n\n"
            "The 6-block ViT of `synthetic-vit` against cheaper levels made three ways, on the world's test split "
            "(the files' own tables, with their cascades, are under Recall per level and cascade):\n\n" +
            "\n".join(rows))


def simulate_tables(results: Path, out: Path) -> str | None:
    parts = []
    for path in sorted(results.glob("simulate_*.json")):
        doc = json.loads(path.read_text())
        rows = ["| cascade | m | R@1 | R@10 (95% CI) | F_life measured | F_life Eq. 1 | level coverage | p50 ms |",
                "|---|---|---|---|---|---|---|---|"]
        for row in doc["levels"] + doc["cascades"]:
            r, ci = row["recall"], row["recall_ci"]["10"]
            name = " -> ".join(row["cascade"]) + (" (HTTP)" if row.get("url") else "")
            cover = ", ".join(f"{c:.3f}" for c in (row.get("coverage_per_level") or [])[1:])
            lat = (row.get("latency_ms") or {}).get("p50")
            rows.append(f"| {name} | {','.join(map(str, row['m']))} | {r['1']:.3f} | {r['10']:.3f} "
                        f"({ci[0]:.3f}-{ci[1]:.3f}) | {fmt(row.get('f_life_measured'), 2)} | {row['f_life_eq1']:.2f} | "
                        f"{cover} | {fmt(lat, 1)} |")
        parts.append(f"`{path.name}`: ladder {doc['ladder']}, {doc['queries']} queries over {doc['images']} images, "
                     f"{doc['distinct_targets']} distinct target images, p asked {doc['p_requested']}, measured "
                     f"{doc['p_measured']:.4f}.\n\n" + "\n".join(rows))
    return "## Query streams (`bicascade simulate`)\n\n" + "\n\n".join(parts) if parts else None


def curves(results: Path, out: Path) -> str | None:
    doc = read_result(results / "curves.json")
    if doc is None:
        return None
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    rows = ["| arch | image GFLOPs | text GFLOPs | samples | lr | batch | in groups | val R@1 at 1/4 | at 1/2 "
            "| at the end | train s | of the longest run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shipped = {end["arch"]: end for end in doc.get("shipped", [])}
    colours: dict[str, str] = {}
    same = ("lr", "hard_groups", "text_gflops")
    for run in doc["runs"]:  # runs with another text tower, batch mix or learning rate than the shipped ones: dashed
        xs = [p["samples"] for p in run["points"]]
        ys = [p["val_recall"]["1"] for p in run["points"]]
        end = shipped.get(run["arch"], run)
        style = "-" if all(end[k] == run[k] for k in same) else "--"
        (line,) = ax.plot(xs, ys, marker=".", linestyle=style, color=colours.get(run["arch"]),
                          label=f"{run['arch']} ({run['gflops']:.4f} GFLOPs), text {run['text_gflops']:.4f}, "
                                f"{run['samples'] // 1000}k" + (f", lr {run['lr']}" if run["lr"] != end["lr"] else ""))
        colours.setdefault(run["arch"], line.get_color())
        at = [ys[min(range(len(xs)), key=lambda i, f=f: abs(xs[i] - f * run["samples"]))] for f in (0.25, 0.5)]
        rows.append(f"| {run['arch']} | {run['gflops']:.4f} | {run['text_gflops']:.4f} | {run['samples']} "
                    f"| {run['lr']} | {run['batch_size']} | {run['hard_groups']:.0%} | {at[0]:.3f} | {at[1]:.3f} "
                    f"| {ys[-1]:.3f} | {run['points'][-1]['seconds']:.0f} | |")
    for end in doc.get("shipped", []):  # the shipped schedule: its own cosine run, ended
        ax.scatter([end["samples"]], [end["val_recall"]["1"]], s=70, marker="*", color=colours.get(end["arch"]),
                   zorder=3, label=f"{end['arch']} shipped ({end['samples']} samples)")
        kin = [r for r in doc["runs"] if r["arch"] == end["arch"] and all(r[k] == end[k] for k in same)]
        longest = max(kin, key=lambda r: r["samples"], default=None)  # how near the shipped level is to a plateau
        share = (f"{end['val_recall']['1'] / longest['points'][-1]['val_recall']['1']:.0%} of "
                 f"{longest['points'][-1]['val_recall']['1']:.3f} at {longest['samples'] // 1000}k" if longest else "")
        rows.append(f"| {end['arch']} (shipped) | | {end['text_gflops']:.4f} | {end['samples']} | {end['lr']} | "
                    f"{end['batch_size']} | {end['hard_groups']:.0%} | | | {end['val_recall']['1']:.3f} | | {share} |")
    ax.set(xlabel="training samples seen", ylabel="validation R@1", title=f"Learning curves, ladder {doc['ladder']}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: the curves stay visible
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    return ("## Learning curves (`bench/curves.py`)\n\nOne cosine schedule per level over the whole budget, evaluated "
            "on the validation split as it goes; dashed: another text tower (text GFLOPs per caption), learning rate "
            "or batch mix than the shipped levels, whose own runs end at the stars.\n\n"
            "![learning curves](curves.png)\n\n" + "\n".join(rows))


def generic(name: str, title: str, about: str) -> Section:
    def section(results: Path, out: Path) -> str | None:
        doc = read_result(results / name)
        if doc is None:
            return None
        return f"## {title}\n\n{about}\n\n```json\n{json.dumps(doc, indent=2)}\n```"
    return section


def query_section(results: Path, out: Path) -> str | None:
    doc = read_result(results / "query_cpu.json")
    if doc is None:
        return None
    rows = ["| ingress | clients | depth | searches/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    rows += ["| " + " | ".join(str(r[k]) for k in ("ingress", "clients", "depth", "searches_per_s", "p50_ms", "p99_ms",
                                                   "errors")) + " |" for r in doc["http"]]
    local, hops, ratios, cold = doc["in_process"], doc["breakdown_ms_one_client"], doc["ratios"], doc["cold_in_process"]
    return ("## Serving (`bench/query.py`)\n\n"
            f"Database `{doc['db']}` (ladder {doc['ladder']}), {doc['queries']} distinct queries repeated, warm "
            "caches, through `bicascade serve` over HTTP on 127.0.0.1 (through Serve's proxy, and with `--direct`: "
            "the ingress replica answering HTTP itself), in one run:\n\n" + "\n".join(rows) + "\n\n"
            f"The same queries in process (`query.LocalSearch`, one thread, every text embedding computed): "
            f"{local['searches_per_s']} searches/s, p50 {local['p50_ms']} ms. " +
            " ".join(f"{ingress}: HTTP at 8 clients over in process {r['http_8_clients_over_in_process']}, depth 3 "
                     f"over depth 1 (p50, one client) {r['depth3_over_depth1_p50_one_client']}."
                     for ingress, r in ratios.items()) + "\n\n"
            "Where a warm search's time goes (one client, medians, ms): " +
            "; ".join(f"{ingress}, depth {depth}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in h.items())
                      for ingress, by_depth in hops.items() for depth, h in by_depth.items()) + ".\n\n"
            f"Cold queries (new texts) over HTTP: p50 {doc['cold_http_new_texts']['p50_ms']} ms. Cold-query image "
            f"encoding in process, [s, l] over [s, m, l]: {cold['f_latency_measured_flops']:.2f} in FLOPs, "
            f"{cold['f_latency_measured_seconds']:.2f} in seconds; Eq. 2: {cold['f_latency_eq2']:.2f}.")


def build_section(results: Path, out: Path) -> str | None:
    docs = [json.loads(path.read_text()) for path in sorted(results.glob("build*.json"))]
    rows = ["| device | level 0 | images | bare loop img/s | index job img/s | ratio | after start-up img/s | ratio | "
            "start-up s |", "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {doc.get('device', 'cpu')} | {doc['model']} | {r['images']} | {r['bare_images_per_s']} | "
             f"{r['job_images_per_s']} | {r['ratio']} | {r['job_steady_images_per_s']} | {r['steady_ratio']} | "
             f"{r['job_startup_s']} |" for doc in docs for r in doc.get("runs", [])]
    if len(rows) == 2:
        return None
    setup = "; ".join(f"{d['model']}: batch {d['batch_size']}, {d['threads']} threads" for d in docs)
    return (f"## Index throughput (`bench/build.py`)\n\nThe Ray Data job against one process reading, hashing, "
            f"decoding, cropping and encoding the same files with the same model ({setup}).\n\n" + "\n".join(rows))


def audit_section(results: Path, out: Path) -> str | None:
    doc = read_result(results / "audit_cpu.json")
    if doc is None:
        return None
    a = doc["audit"]
    return (f"## The live recall audit against the offline truth (`bench/audit.py`)\n\nA {doc['queries']}-query "
            f"stream (p = {doc['p_measured']:.3f}, {doc['distinct_targets']} distinct target images) over "
            f"{doc['images']} images through `bicascade serve` with {doc['clients']} clients, cutoffs "
            f"{doc['cutoffs']}, the router auditing {a['fraction']:.0%} of the queries: the top level over "
            f"{doc['audit_factor']} x m_1 level-0 candidates, against the served top {doc['k']}.\n\n"
            "| audited queries | audit's recall kept | the same, offline, every query | 95% sampling error at that "
            "many | kept vs the top level over the whole corpus | R@10 served | R@10 top level alone |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {a['queries']} | {a['recall_kept']:.4f} | {doc['offline_kept_vs_audit_reference']:.4f} | "
            f"{doc['sampling_error_95']:.4f} | {doc['offline_kept_vs_top_level_whole_corpus']:.4f} | "
            f"{doc['recall_at_k_served']:.4f} | {doc['recall_at_k_top_level']:.4f} |\n\n"
            f"The audit embedded {a['images_encoded']} images ({a['gflops']:.1f} image-encoder GFLOPs) that the "
            "cascade did not need.")


def million_section(results: Path, out: Path) -> str | None:
    doc = read_result(results / "million_cpu.json")
    if doc is None:
        return None
    ann = ["| nprobes | refine | recall@50 (text queries) | p50 ms |", "|---|---|---|---|"]
    ann += [f"| {a['nprobes']} | {a['refine_factor']} | {a['recall_at_50']} | {a['p50_ms']} |" for a in doc["ann"]]
    return (f"## A million images (`bench/million.py`)\n\n![throughput and memory](million.png)\n\n"
            f"{doc['images']} images "
            + (f"generated in {doc['generated_s']} s" if doc["generated_s"] is not None else
               "(the world of an earlier run, reused)") + f"; indexed in {doc['index_first_run_s']} s "
            f"until a SIGKILL at {doc['killed_at_ledgered']} ledgered images, then resumed in "
            f"{doc['index_resume_s']} s; "
            f"{doc['rows']} level-0 rows and {doc['image_rows']} images (exactly once: {doc['exactly_once']}); "
            f"{doc['bytes_on_disk_per_image']} bytes on disk per image; peak RSS: driver {doc['peak_driver_mib']} MiB, "
            f"Ray workers {doc['peak_workers_mib']} MiB; level 0's ANN index ({doc['ann_index']}) built in "
            f"{doc['ann_build_s']} s.\n\n" + "\n".join(ann)
            + (serving_rows(doc["serving"]) if "serving" in doc else ""))


def serving_rows(doc: dict) -> str:
    rows = ["| ingress | clients | searches/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['ingress']} | {r['clients']} | {r['searches_per_s']} | {r['p50_ms']} | "
             f"{r['p99_ms']} | {r['errors']} |" for r in doc["warm"]]
    return ("\n\nServed over HTTP (full cascade, warm caches):\n\n" + "\n".join(rows) +
            f"\n\nCold searches (new texts, empty caches): p50 {doc['cold_new_texts']['p50_ms']} ms, "
            f"p99 {doc['cold_new_texts']['p99_ms']} ms.")


def gpu_section(results: Path, out: Path) -> str | None:
    parts = [gpu_run(json.loads(path.read_text())) for path in sorted(results.glob("gpu*.json"))]
    return "\n\n".join(parts) if parts else None


def gpu_run(doc: dict) -> str:
    s, b = doc["serve"], doc["index_vit_b_16"]
    levels = ["| level | image GFLOPs | cold p50 ms | images encoded per cold query | warm p50 ms |",
              "|---|---|---|---|---|"]
    levels += [f"| {c['model']} | {g:.1f} | {c['p50_ms']} | {c['encoded_per_query']} | {w['p50_ms']} |"
               for c, w, g in zip(s["cold"]["levels"], s["warm"]["levels"], s["gflops"])]
    load_rows = ["| clients | depth | searches/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    load_rows += [f"| {r['clients']} | {r['depth']} | {r['searches_per_s']} | {r['p50_ms']} | {r['p99_ms']} |"
                  for r in s["load"]]
    return (f"## On a GPU (`bench/gpu.py`, {doc['card']}, {doc['cpus']} CPU cores)\n\n"
            f"{doc['images']} images, batch {doc['batch_size']}; the ladder {' -> '.join(s['ladder'])} with random "
            f"weights, served over HTTP on 127.0.0.1. Each level's own time inside a served search (medians over 30 "
            f"queries; cold: new texts against empty caches, whole search p50 {s['cold']['client']['p50_ms']} ms; "
            f"warm: whole search p50 {s['warm']['client']['p50_ms']} ms):\n\n" + "\n".join(levels) +
            "\n\nWarm closed-loop load, cascade cut at each depth:\n\n" + "\n".join(load_rows) +
            f"\n\nIndexing in the same run (ViT-B-16 level 0, CPU tasks decode, one GPU actor encodes): bare loop "
            f"{b['bare_images_per_s']} img/s, job {b['job_images_per_s']} img/s end to end ({b['job_startup_s']} s "
            f"start-up), {b['job_steady_images_per_s']} after start-up. This run predates the encoder normalising "
            "on the GPU: see the index-throughput table for the run after it.")


def plan_section(results: Path, out: Path) -> str | None:
    doc = read_result(results / "plan_synthetic.json")
    if doc is None:
        return None
    rows = ["| cascade | m | adaptive margin | R@1 | R@10 | F_life measured | F_life Eq. 1 |",
            "|---|---|---|---|---|---|---|"]
    for c in doc["frontier"]:
        rows.append(f"| {' -> '.join(c['cascade'])} | {','.join(map(str, c['cutoffs']))} | "
                    f"{fmt(c['adaptive_margin'], 2)} | {c['recall']['1']:.3f} | {c['recall']['10']:.3f} | "
                    f"{c['f_life_measured']:.2f} | {c['f_life_eq1']:.2f} |")
    chosen, at = doc["chosen"], str(doc.get("at", 10))
    picture = "\n\n![frontier](plan_frontier.png)" if (out / "plan_frontier.png").exists() else ""
    return (f"## The quality-cost frontier (`bicascade plan`)\n\n{doc['candidates']} cascades of {doc['ladder']}, "
            f"recall on {doc['queries']} held-out captions, cost on a {doc['stream_queries']}-query stream at p = "
            f"{doc['p_measured']:.3f}; frontier and budget on R@{at}; the top level alone: R@{at} "
            f"{doc['reference']['recall'][at]:.4f}. Chosen within {doc['recall_loss_points']} points: "
            f"{' -> '.join(chosen['cascade'])}, m = {chosen['cutoffs']}"
            + (f", adaptive margin {chosen['adaptive_margin']}" if chosen['adaptive_margin'] else "")
            + f", R@{at} {chosen['recall'][at]:.4f}, F_life {chosen['f_life_measured']:.2f} measured.{picture}\n\n"
            + "\n".join(rows))


def rss_section(results: Path, out: Path) -> str | None:
    doc = read_result(results / "rss_cpu.json")
    if doc is None:
        return None
    marks = doc["marks"]
    names = sorted(next(iter(marks.values()))["rss_mib"])
    rows = ["| queries | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += [f"| {n} | " + " | ".join(" / ".join(str(x) for x in m["rss_mib"].get(k, [])) for k in names) + " |"
             for n, m in marks.items()]
    return (f"## Serving memory (`bench/rss.py`)\n\nRSS in MiB of each serving process over a {doc['queries']}-query "
            f"stream with {doc['clients']} clients (CacheWriter: one process per level's cache table):\n\n"
            + "\n".join(rows))


def ann_section(results: Path, out: Path) -> str | None:
    parts = []
    for path in sorted(results.glob("ann_*.json")):
        doc = json.loads(path.read_text())
        shape = doc.get("shape")
        about = (f"image-image cosine {shape['image_image_cosine']:.2f}, query-top-1 cosine "
                 f"{shape['query_top1_cosine']:.2f}, query-50th cosine {shape['query_top50_cosine']:.2f}"
                 if shape else "queries drawn like the images")
        rows = ["| index | partitions | nprobes | refine | recall@50 | p50 ms |", "|---|---|---|---|---|---|"]
        rows += [f"| {ix['index']} | {ix['partitions']} | {r['nprobes']} | {r['refine_factor']} | "
                 f"{r['recall_at_50']} | {r['p50_ms']} |" for ix in doc["indexes"] for r in ix["sweep"]]
        parts.append(f"`{path.name}`: world `{doc.get('world', 'clustered')}`, {doc['rows']} x {doc['dim']} ({about}); "
                     f"exact search p50 {doc['exact_p50_ms']} ms.\n\n" + "\n".join(rows))
    return ("## Level-0 ANN at 1M vectors (`bench/ann.py`)\n\nRecall@50 against exact search and p50 latency. The "
            "`clip` world's text queries are the hard case the plan is chosen for.\n\n" + "\n\n".join(parts)
            if parts else None)


SECTIONS: list[Section] = [
    curves, eval_tables, cheap_levels, simulate_tables, plan_section, query_section, build_section, rss_section,
    audit_section, million_section, gpu_section, ann_section,
    generic("costs_measure_cpu.json", "Encoder cost, counted and measured (`bicascade costs --measure`)",
            "GFLOPs on the real architectures and seconds per image measured here with random weights."),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# Results\n\nRendered by `make results` from the JSON under `bench/results/` (each file is the output "
             "of the command named in its section, on the 2-core CPU machine this project is developed on unless "
             "the file says otherwise). Do not edit by hand."]
    parts += [s for s in (section(results, out) for section in SECTIONS) if s]
    (out / "RESULTS.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out / 'RESULTS.md'} ({len(parts) - 1} sections)")


if __name__ == "__main__":
    main()
