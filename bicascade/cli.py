"""The `bicascade` command: one subcommand per job; heavy imports happen inside each so `--help` is instant."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

log = logging.getLogger("bicascade")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"empty cascade {text!r}")
    return names


def emit(args: argparse.Namespace, doc: Any, human: Callable[[Any], str]) -> None:
    """Exactly one JSON document on stdout with --json, else a readable rendering."""
    print(json.dumps(doc, indent=2) if args.json else human(doc), flush=True)


def cmd_costs(args: argparse.Namespace) -> None:
    from bicascade import costs

    doc = costs.cascade_report(args.cascades, p=args.p, cutoffs=args.m, measure=args.measure,
                               batch_size=args.batch_size, device=args.device)
    emit(args, doc, format_costs)


def format_costs(doc: dict) -> str:
    measured = "measure" in doc
    head = f"{'cascade':<52} {'GFLOPs per level':<28} {'F_life':>7} {'F_lat':>6}"
    head += f" {'s/img (measured)':<28} {'F_life':>7} {'F_lat':>6}" if measured else ""
    lines = [f"p = {doc['p']}, m = {doc['m']}; 1-level rows compare with {doc['reference']}", head]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in doc["cascades"]:
        line = f"{','.join(r['cascade']):<52} {', '.join(f'{g:.2f}' for g in r['gflops']):<28} " \
               f"{fmt(r['f_life']):>7} {fmt(r['f_latency']):>6}"
        if measured:
            secs = ", ".join(f"{s:.4f}" for s in r["seconds_per_image"])
            line += f" {secs:<28} {fmt(r['f_life_measured']):>7} {fmt(r['f_latency_measured']):>6}"
        lines.append(line)
    return "\n".join(lines)


def cmd_ladders(args: argparse.Namespace) -> None:
    from bicascade import models

    doc = {"ladders": [{"name": l.name, "levels": list(l.levels), "shared_text_tower": l.shared_text_tower}
                       for l in models.list_ladders()]}
    emit(args, doc, lambda d: "\n".join(f"{l['name']:<20} {' -> '.join(l['levels'])}"
                                        + ("  (shared text tower)" if l["shared_text_tower"] else "")
                                        for l in d["ladders"]))


def cmd_train(args: argparse.Namespace) -> None:
    import time

    from bicascade import models
    from bicascade.pipelines import train

    t0 = time.perf_counter()
    ladder, root = train.ensure_ladder(args.ladder, args.world, device=args.device)
    doc = {"ladder": ladder.name, "levels": list(ladder.levels), "world": str(root),
           "checkpoints": [models.get_model(n).checkpoint for n in ladder.levels],
           "seconds": round(time.perf_counter() - t0, 1)}
    emit(args, doc, lambda d: f"ladder {d['ladder']} ready in {d['seconds']} s: " + " -> ".join(d["levels"]))


def cmd_eval(args: argparse.Namespace) -> None:
    from bicascade.pipelines import evaluate, train

    ladder, root = train.ensure_ladder(args.ladder, args.world, device=args.device)
    if root is None:
        raise ValueError(f"ladder {args.ladder!r} has no world of its own: pass --world DIR")
    doc = evaluate.evaluate(root, ladder, cutoffs=args.m, p=args.p, device=args.device, db=args.db)
    emit(args, doc, evaluate.format_table)


def cmd_index(args: argparse.Namespace) -> None:
    from bicascade.pipelines import index

    doc = index.run_index(args.source, args.db, args.ladder, index.IndexConfig(batch_size=args.batch_size))
    emit(args, doc, lambda d: f"{d['rows']} rows in {d['table']} ({d['new_rows']} new, {d['errors']} errors, "
                              f"{d['skipped']} skipped) in {d['seconds']} s, {d['images_per_s']} images/s")


def cmd_search(args: argparse.Namespace) -> None:
    from bicascade.actors import router
    from bicascade.storage import tables

    cascade, stores = router.local_cascade(args.db, args.ladder, args.m, device=args.device)
    out = cascade.search(args.text, k=args.k)
    for store in stores:
        store.flush()
    doc = router.to_json(out, tables.Database(args.db).uris([r.id for r in out.results]),
                         [lv.name for lv in cascade.levels], cascade.text_encodes)
    emit(args, doc, format_search)


def format_search(doc: dict) -> str:
    lines = [f"{i + 1:>3}. {r['score']:.4f}  {r['id']}  {r['uri']}" for i, r in enumerate(doc["results"])]
    lines += [f"{s['model']}: {s['candidates']} candidates, {s['cache_hits']} cached, {s['encoded']} encoded, "
              f"{s['ms']:.1f} ms" for s in doc["stats"]["levels"]]
    return "\n".join(lines + [f"{doc['stats']['ms']:.1f} ms, {doc['stats']['gflops']:.3f} GFLOPs of image encoding, "
                               f"{doc['stats']['text_encodes']} text embedding(s)"])


def cmd_serve(args: argparse.Namespace) -> None:
    from bicascade.serve import server
    from bicascade.serve.app import AppConfig

    server.serve_forever(AppConfig(db=args.db, ladder=args.ladder, cutoffs=args.m, max_inflight=args.max_inflight),
                         host=args.host, port=args.port)


def cmd_simulate(args: argparse.Namespace) -> None:
    from bicascade.pipelines import report, simulate

    cfg = simulate.SimConfig(p=args.p, queries=args.queries, skew=args.skew, cutoffs=tuple(args.m), k=args.k,
                             cascade=tuple(args.cascade) if args.cascade else None, seed=args.seed, url=args.url,
                             concurrency=args.concurrency)
    doc = simulate.simulate(args.db, args.ladder, cfg, world_root=args.world, report_dir=args.report,
                            sweep=args.sweep or (), device=args.device)
    emit(args, doc, lambda d: report.summary(d) + (f"\nreport: {d['report']}" if d["report"] else ""))


def cmd_demo(args: argparse.Namespace) -> None:
    from bicascade.pipelines import demo

    doc = demo.run(workdir=args.workdir, ladder=args.ladder)
    emit(args, doc, demo.format_summary)
    if not args.no_serve:
        from bicascade.serve import server
        from bicascade.serve.app import AppConfig

        server.serve_forever(AppConfig(db=doc["db"], ladder=doc["ladder"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bicascade", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("costs", help="image-encoder GFLOPs per level and Eq. 1 / Eq. 2 cost reductions")
    p.add_argument("cascades", nargs="+", type=_names, metavar="CASCADE",
                   help="comma list of model names, cheapest first, e.g. ViT-B-16,ViT-L-14,ViT-g-14")
    p.add_argument("--p", type=float, default=0.1, help="p-small-world coverage fraction (default 0.1)")
    p.add_argument("--m", type=_ints, default=[50, 14], help="cutoffs m_1,m_2,... (default 50,14)")
    p.add_argument("--measure", action="store_true", help="also time each image encoder here (random weights)")
    p.add_argument("--batch-size", type=int, default=4, help="batch size for --measure (default 4)")
    p.add_argument("--device", default=None, help="device for --measure (default: cuda if present, else cpu)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_costs)

    p = sub.add_parser("ladders", help="list registered model ladders, built-in and derived")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ladders)

    p = sub.add_parser("train", help="train (or reuse) a ladder of the synthetic world; cached and resumable")
    p.add_argument("--ladder", default="synthetic",
                   help="training profile: synthetic (default), synthetic-tiny, synthetic-mlce (its s level with "
                        "MLCE, for the ablation), synthetic-vit (ViTs of 2, 4 and 6 blocks, trained independently)")
    p.add_argument("--world", default=None, help="where the world is written (default: the user cache)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distil cheap levels from a top model (two-stage distillation, or self-pruning "
                                       "into its first blocks); they share its text tower, so a query needs one text "
                                       "embedding; cached and resumable")
    p.add_argument("--ladder", default="synthetic-distilled",
                   help="distillation profile: synthetic-distilled (default; teacher: synthetic's top level, "
                        "students start from its s and m levels), synthetic-distilled-scratch (students start from "
                        "random weights), synthetic-spds (synthetic-vit's 6-block ViT trained on with SPDS; "
                        "levels: its first 2 and 4 blocks, then all 6), synthetic-spds-scratch (the same from random "
                        "weights), synthetic-tiny-distilled, synthetic-tiny-spds")
    p.add_argument("--world", default=None, help="where the world is written (default: the user cache)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="Recall@1/5/10 per level and per cascade on the world's held-out captions")
    p.add_argument("--db", default=None, help="LanceDB URI whose level-0 table (from `bicascade index`) level 0 "
                                              "searches; without it every level embeds the test split in process")
    p.add_argument("--ladder", default="synthetic", help="ladder to evaluate (default: synthetic, trained if needed)")
    p.add_argument("--world", default=None, help="world directory (default: the ladder's own world)")
    p.add_argument("--m", type=_ints, default=[50, 14], help="cutoffs of the full-depth cascade (default 50,14)")
    p.add_argument("--p", type=float, default=0.1, help="p for F_life by Eq. 1 (default 0.1)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("index", help="embed a corpus with the ladder's cheapest level into LanceDB (resumable)")
    p.add_argument("source", help="folder, parquet (bytes or paths), or webdataset .tar shards; local or s3://...")
    p.add_argument("--db", required=True, help="LanceDB URI (folder or s3://bucket/path)")
    p.add_argument("--ladder", default=None, help="ladder whose level 0 embeds the corpus (default: synthetic)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="one cascaded query in process (no server); writes computed embeddings back")
    p.add_argument("text")
    p.add_argument("--db", required=True, help="LanceDB URI indexed by `bicascade index`")
    p.add_argument("--ladder", default="synthetic")
    p.add_argument("--m", type=_ints, default=[50, 14], help="cutoffs m_1,m_2,... (default 50,14)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve the cascade over HTTP with Ray Serve until Ctrl-C")
    p.add_argument("--db", required=True, help="LanceDB URI indexed by `bicascade index`")
    p.add_argument("--ladder", default="synthetic")
    p.add_argument("--m", type=_ints, default=[50, 14], help="cutoffs m_1,m_2,... (default 50,14)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-inflight", type=int, default=64,
                   help="searches in flight per ingress replica before answering 503 + Retry-After (default 64)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("simulate", help="replay a p-small-world query stream; measured F_life, recall and latency "
                                        "vs Eq. 1 / Eq. 2, with a report of plots")
    p.add_argument("--db", required=True, help="LanceDB URI with the world's test split indexed")
    p.add_argument("--ladder", default="synthetic")
    p.add_argument("--world", default=None, help="world directory (default: the ladder's own world)")
    p.add_argument("--p", type=float, default=0.1, help="fraction of the corpus the stream touches (default 0.1)")
    p.add_argument("--queries", type=int, default=10_000, help="queries in the stream (default 10000)")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of topic popularity (default 1.0)")
    p.add_argument("--cascade", type=_names, default=None, help="model names, cheapest first (default the ladder)")
    p.add_argument("--m", type=_ints, default=[50, 14], help="cutoffs m_1,m_2,... (default 50,14)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="also replay against this running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight with --url (default 8)")
    p.add_argument("--sweep", type=lambda t: [float(x) for x in t.split(",")], default=None,
                   help="also replay the cascade at each of these p, e.g. 0.01,0.05,0.1,0.2,0.5")
    p.add_argument("--report", default=None, help="write plots and summary.md to this directory")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="everything end to end on the embedded default world")
    p.add_argument("--ladder", default="synthetic", help="ladder profile (default synthetic; synthetic-tiny is quick)")
    p.add_argument("--workdir", default="work", help="where the world, the db and reports go (default ./work)")
    p.add_argument("--no-serve", action="store_true", help="stop after the report instead of serving")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Root at ERROR hides open_clip's "initialized randomly" chatter; our own logger speaks at INFO.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"bicascade {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
