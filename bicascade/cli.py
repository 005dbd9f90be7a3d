"""The `bicascade` command: one subcommand per job; heavy imports happen inside each so `--help` is instant."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bicascade")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _counts(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(",") if part.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N,..., got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"empty cascade {text!r}")
    return names


def emit(args: argparse.Namespace, report: Any, human: Callable[[Any], str] | None = None) -> None:
    """Exactly one JSON document on stdout with --json, else a readable rendering (reports render themselves)."""
    doc = report.to_json() if hasattr(report, "to_json") else report
    text = json.dumps(doc, indent=2) if getattr(args, "json", False) else (human or type(report).format)(report)
    print(text, flush=True)


def _db_ladder(args: argparse.Namespace):
    """The ladder a command runs on: the database's own unless --ladder names another with the same level 0."""
    from bicascade import query
    from bicascade.storage import tables

    if args.db:
        return query.open_ladder(tables.Database(args.db), args.ladder)
    if not args.ladder:
        raise _bad("give --db (a database remembers its ladder) or --ladder NAME")
    return query.registered(args.ladder)


def _bad(message: str):
    from bicascade.errors import BadInputError

    return BadInputError(message)


def cmd_costs(args: argparse.Namespace) -> None:
    from bicascade import costs

    emit(args, costs.cascade_report(args.cascades, p=args.p, cutoffs=args.m, measure=args.measure,
                                    batch_size=args.batch_size, device=args.device))


def cmd_capacity(args: argparse.Namespace) -> None:
    from bicascade import capacity

    assumed = capacity.Assumptions(mfu=args.mfu, node_memory_gb=args.node_memory_gb)
    emit(args, capacity.plan(args.images, args.ladder, args.gpu, args.qps, args.p, args.m, args.corpus,
                             args.usd_per_gpu_hour, assumed))


def cmd_kuberay(args: argparse.Namespace) -> None:
    from bicascade.serve import kuberay

    given = {k: getattr(args, k) for k in ("db", "source", "ladder", "name", "image", "gpu_workers")
             if getattr(args, k) is not None}
    command = " ".join(["bicascade kuberay", *(f"--{k.replace('_', '-')} {v}" for k, v in given.items())])
    paths = kuberay.write(kuberay.Cluster(**given), args.out, command)
    emit(args, {"written": [str(p) for p in paths]}, lambda doc: "\n".join(doc["written"]))


def cmd_ladders(args: argparse.Namespace) -> None:
    from bicascade import registry
    from bicascade.pipelines.lab import train

    made = {c["name"]: c for c in train.catalog()}
    rows = []
    for ladder in registry.list_ladders():
        kind = "built-in" if registry.is_builtin(ladder.name) else "trainable" if ladder.name in made else "user"
        row = {"name": ladder.name, "levels": list(ladder.levels), "shared_text_tower": ladder.shared_text_tower,
               "kind": kind}
        rows.append(row | ({"ready": made[ladder.name]["ready"], "make": made[ladder.name]["make"]}
                           if ladder.name in made else {"ready": True}))
    rows += [c for name, c in made.items() if name not in {r["name"] for r in rows}]

    def human(doc: dict) -> str:
        return "\n".join(f"{r['name']:<28} {r['kind']:<10} {'ready' if r['ready'] else 'not trained':<12} "
                         f"{' -> '.join(r['levels'])}" + ("  (shared text tower)" if r["shared_text_tower"] else "")
                         + ("" if r["ready"] else f"  [make: {r['make']}]") for r in doc["ladders"])
    emit(args, {"ladders": rows}, human)


def cmd_ladders_add(args: argparse.Namespace) -> None:
    from bicascade import ladders

    if bool(args.levels) == bool(args.from_file) or not (args.name or args.from_file):
        raise _bad("give NAME and its levels (LEVEL ...), or --from FILE.yaml")
    if args.from_file:
        name, specs, description = ladders.from_yaml(args.from_file, args.name)
    else:
        name, description = args.name, ""
        specs = [ladders.parse_level(level, name, j) for j, level in enumerate(args.levels)]
    emit(args, ladders.add(name, specs, args.description or description))


def cmd_ladders_show(args: argparse.Namespace) -> None:
    from bicascade import ladders

    emit(args, ladders.show(args.name))


def cmd_ladders_remove(args: argparse.Namespace) -> None:
    from bicascade import registry

    path = registry.remove_ladder(args.name)
    emit(args, {"removed": args.name, "file": str(path)}, lambda d: f"removed ladder {d['removed']} ({d['file']})")


def cmd_train(args: argparse.Namespace) -> None:
    from bicascade import registry
    from bicascade.pipelines.lab import train

    t0 = time.perf_counter()
    ladder, root = train.ensure_ladder(args.ladder, args.world, device=args.device)
    doc = {"ladder": ladder.name, "levels": list(ladder.levels), "world": str(root),
           "checkpoints": [registry.get_model(n).checkpoint for n in ladder.levels],
           "seconds": round(time.perf_counter() - t0, 1)}
    emit(args, doc, lambda d: f"ladder {d['ladder']} ready in {d['seconds']} s: " + " -> ".join(d["levels"]))


def cmd_eval(args: argparse.Namespace) -> None:
    from bicascade.pipelines.lab import train
    from bicascade.pipelines.measure import evaluate
    from bicascade.storage import tables

    if args.ladder and not args.db:  # a trainable ladder not trained yet: name the command that trains it
        train.require_ready(args.ladder)
    ladder = _db_ladder(args)
    db = tables.Database(args.db) if args.db else None
    world = args.world or (None if db or args.labels else train.world_root(train.profile(args.ladder)))
    from bicascade.protocol import Plan

    chosen = Plan.read(args.plan) if args.plan else None
    emit(args, evaluate.evaluate(_held_out(args.labels, db, world), ladder, cutoffs=args.m, p=args.p,
                                 device=args.device, db=args.db, plan=chosen))


def _held_out(labels: str | None, db, world: str | None):
    """What eval and plan measure recall on: a user's labelled queries over the database, else a world's test split
    (`world`, or the one the database indexed)."""
    from bicascade.pipelines.measure import evaluate

    if labels is None:
        return evaluate.world_heldout(evaluate.world_of(db, world))
    if db is None:
        raise _bad("--labels names images of a database: pass --db too")
    return evaluate.labelled_heldout(db, labels)


def cmd_index(args: argparse.Namespace) -> None:
    from bicascade.pipelines.ingest import index

    config = index.IndexConfig(batch_size=args.batch_size, ann_min_rows=args.ann_min_rows,
                               sync=args.sync or args.watch is not None)
    if args.watch is None:
        emit(args, index.run_index(args.source, args.db, args.ladder, config))
        return
    stop = threading.Event()
    try:
        while not stop.is_set():  # until Ctrl-C: each pass adds, re-reads and removes what changed since the last
            report = index.run_index(args.source, args.db, args.ladder, config)
            # with --json one line per pass (JSON Lines), for whatever follows the stream
            print(json.dumps(report.to_json()) if args.json else report.format(), flush=True)
            # Ctrl-C between passes ends the wait at once; set after each pass, as starting Ray may replace it
            signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=stop.set).start())  # not under a lock
            stop.wait(args.watch)
    except KeyboardInterrupt:  # during a pass: the job is resumable
        pass


def _where(text: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"uri_prefix\": \"photos/2024/\"}'")
    return doc


def cmd_search(args: argparse.Namespace) -> None:
    from bicascade.collection import Collection

    if (args.text is None) == (args.image is None):
        raise _bad("give a text query or --image PATH")
    with Collection(args.db, args.ladder, args.m, device=args.device) as photos:
        emit(args, photos.search(args.text, image=args.image, k=args.k, where=args.where, depth=args.depth,
                                 mode=args.mode))


def cmd_remove(args: argparse.Namespace) -> None:
    from bicascade.collection import Collection

    removed = Collection(args.db).remove(args.ids, uri_prefix=args.uri_prefix, where=args.where)
    emit(args, {"removed": removed}, lambda d: "\n".join(f"{n}: {c} rows removed" for n, c in d["removed"].items())
         or "nothing matched")


def cmd_serve(args: argparse.Namespace) -> None:
    from bicascade.protocol import Plan
    from bicascade.serve import server
    from bicascade.serve.app import AppConfig

    server.serve_forever(AppConfig(db=args.db, ladder=args.ladder, cutoffs=args.m, max_inflight=args.max_inflight,
                                   api_keys=args.api_key_file, rate=args.rate, burst=args.burst,
                                   replicas=args.replicas or {}, plan=Plan.read(args.plan) if args.plan else None,
                                   group_gflops=args.group_gflops),
                         host=args.host, port=args.port, dashboard=args.dashboard, direct=args.direct)


def cmd_simulate(args: argparse.Namespace) -> None:
    from bicascade.pipelines.measure import evaluate, simulate
    from bicascade.storage import tables

    ladder = _db_ladder(args)
    root = evaluate.world_of(tables.Database(args.db), args.world)
    cfg = simulate.SimConfig(p=args.p, queries=args.queries, skew=args.skew,
                             cutoffs=tuple(args.m) if args.m else None, k=args.k,
                             cascade=tuple(args.cascade) if args.cascade else None, seed=args.seed, url=args.url,
                             concurrency=args.concurrency)
    emit(args, simulate.simulate(args.db, ladder, root, cfg, report_dir=args.report, sweep=args.sweep or (),
                                 device=args.device))


def cmd_plan(args: argparse.Namespace) -> None:
    from pathlib import Path

    from bicascade.pipelines.measure import plan
    from bicascade.storage import tables

    ladder = _db_ladder(args)
    held = _held_out(args.labels, tables.Database(args.db), args.world)
    report = plan.plan(args.db, ladder, held, p=args.p, recall_loss=args.recall_loss, stream_queries=args.queries,
                       device=args.device, at=args.at)
    if args.report:
        plan.plot(report, Path(args.report) / "frontier.png")
    emit(args, report)


def cmd_verify(args: argparse.Namespace) -> int:
    from bicascade.collection import Collection

    report = Collection(args.db).verify(repair=args.repair)
    emit(args, report)
    return 0 if report.ok else 1


def cmd_migrate(args: argparse.Namespace) -> None:
    from bicascade.pipelines.ingest import migrate

    emit(args, migrate.migrate(args.db, args.ladder, warm=args.warm))


def cmd_cache_drop(args: argparse.Namespace) -> None:
    from bicascade.pipelines.ingest import migrate

    gone = migrate.drop(args.db, args.fingerprints or None)
    emit(args, {"dropped": gone}, lambda d: "dropped " + (", ".join(d["dropped"]) or "nothing"))


def cmd_demo(args: argparse.Namespace) -> None:
    from bicascade.pipelines import demo

    report = demo.run(workdir=args.workdir, ladder=args.ladder)
    emit(args, report)
    if not args.no_serve:
        from bicascade.serve import server
        from bicascade.serve.app import AppConfig

        server.serve_forever(AppConfig(db=report.db))


LABELS = ("labelled queries over your own database instead of the world's test captions: JSON lines "
          '{"query": "a red bicycle", "relevant": ["photos/bike.jpg", ...]} (an image by id, indexed uri or path, '
          "relative to the file's folder)")


def build_parser() -> argparse.ArgumentParser:
    from bicascade.cascade import DEFAULT_CUTOFFS

    parser = argparse.ArgumentParser(prog="bicascade", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cutoffs = "cutoffs m_1,m_2,... (default: 50,14 for three levels)"
    where = ('a filter as the HTTP API\'s `where` object, e.g. \'{"uri_prefix": "photos/2024/", "min_width": 1000}\' '
             "(uri_prefix, caption, min_width, min_height, meta, taken_after, taken_before, camera, near, media_type)")

    def command(name: str, func: Callable, help: str, json_out: bool = True, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        if json_out:
            p.add_argument("--json", action="store_true", help="print exactly one JSON document on stdout")
        p.set_defaults(func=func)
        return p

    p = command("costs", cmd_costs, "image-encoder GFLOPs per level and Eq. 1 / Eq. 2 cost reductions")
    p.add_argument("cascades", nargs="+", type=_names, metavar="CASCADE",
                   help="comma list of model names, cheapest first, e.g. ViT-B-16,ViT-L-14,ViT-g-14")
    p.add_argument("--p", type=float, default=0.1, help="p-small-world coverage fraction (default 0.1)")
    p.add_argument("--m", type=_ints, default=list(DEFAULT_CUTOFFS), help="cutoffs m_1,m_2,... (default 50,14)")
    p.add_argument("--measure", action="store_true", help="also time each image encoder here (random weights)")
    p.add_argument("--batch-size", type=int, default=4, help="batch size for --measure (default 4)")
    p.add_argument("--device", default=None, help="device for --measure (default: cuda if present, else cpu)")

    p = command("capacity", cmd_capacity, "on paper: GPU-hours and price to index N images, storage per table, "
                "level 0's ANN memory and shards, nodes for a query rate, a year of cache growth (docs/SCALE.md)")
    p.add_argument("--images", type=int, required=True, help="corpus size")
    p.add_argument("--ladder", required=True, help="a ladder (`bicascade ladders`)")
    p.add_argument("--gpu", default="h100", help="h100, h200, a100 or l4 (default h100)")
    p.add_argument("--qps", type=float, default=100.0, help="queries per second to serve (default 100)")
    p.add_argument("--p", type=float, default=0.1, help="p-small-world coverage fraction (default 0.1)")
    p.add_argument("--m", type=_ints, default=list(DEFAULT_CUTOFFS), help=cutoffs)
    p.add_argument("--corpus", choices=("phone", "web"), default="phone",
                   help="12 MP phone photos or 0.3 MP web images: the decode cost and stored copy measured here")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None, help="your price (default: an assumed one)")
    p.add_argument("--mfu", type=float, default=0.35, help="share of the GPU's bf16 peak the encoders reach")
    p.add_argument("--node-memory-gb", type=float, default=128.0, help="memory of a level-0 search node")

    p = command("kuberay", cmd_kuberay, "write KubeRay manifests: a RayService serving a database from object "
                "storage and a RayJob indexing a source into it (README: Kubernetes)")
    p.add_argument("--db", help="the database, on object storage (default s3://my-bucket/bicascade/db)")
    p.add_argument("--source", help="what the RayJob indexes (default s3://my-bucket/photos/)")
    p.add_argument("--ladder", help="the ladder that indexes it (default openclip-vit)")
    p.add_argument("--name", help="the RayService's name (default bicascade)")
    p.add_argument("--image", help="the pods' image (default bicascade:VERSION, built from deploy/Dockerfile)")
    p.add_argument("--gpu-workers", type=int, help="the most GPU pods (default 2)")
    p.add_argument("--out", default="deploy/kuberay", help="folder to write to (default deploy/kuberay)")

    p = command("ladders", cmd_ladders, "list ladders: built-in, your own, and the ones the project can train")
    lsub = p.add_subparsers(dest="action", metavar="ACTION")
    q = lsub.add_parser("add", help="make a ladder from your CLIP models (cheapest first) and save it",
                        description="LEVEL: ARCH@TAG (open_clip pretrained tag), ARCH=PATH (local checkpoint), "
                                    "hf-hub:ORG/REPO, or a bare ARCH (random weights, tests only); a ViT LEVEL "
                                    "ending in #keep=F runs on a fixed fraction F of its patch tokens (a cheaper "
                                    "level without training).")
    q.add_argument("name", nargs="?", help="ladder name (optional with --from when the file names it)")
    q.add_argument("levels", nargs="*", metavar="LEVEL")
    q.add_argument("--from", dest="from_file", metavar="FILE.yaml", help="read the ladder from a YAML file")
    q.add_argument("--description", default="")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_ladders_add)
    q = lsub.add_parser("show", help="one ladder's levels: architectures, GFLOPs, dims, fingerprints, weights")
    q.add_argument("name")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_ladders_show)
    q = lsub.add_parser("remove", help="forget a saved ladder (its checkpoints stay where they are)")
    q.add_argument("name")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_ladders_remove)

    for name, verb in (("train", "train (or reuse) a ladder of the synthetic world; cached and resumable"),
                       ("distill", "distil cheap levels from a top model (two-stage distillation, or self-pruning "
                                   "into its first blocks); they share its text tower; cached and resumable")):
        p = command(name, cmd_train, verb)
        p.add_argument("--ladder", default="synthetic" if name == "train" else "synthetic-distilled",
                       help="training profile (`bicascade ladders` lists them; default %(default)s)")
        p.add_argument("--world", default=None, help="where the world is written (default: the user cache)")
        p.add_argument("--device", default=None)

    p = command("eval", cmd_eval, "Recall@1/5/10 per level and per cascade on held-out queries: the world's test "
                                  "captions, or your own labelled queries (--labels)")
    p.add_argument("--db", default=None, help="database whose level-0 table (from `bicascade index`) level 0 searches "
                                              "and whose ladder is evaluated; without it, --ladder's levels embed "
                                              "the test split in process")
    p.add_argument("--ladder", default=None, help="ladder to evaluate (default: the database's)")
    p.add_argument("--world", default=None, help="world directory (default: the one the database indexed)")
    p.add_argument("--m", type=_ints, default=None, help=cutoffs)
    p.add_argument("--p", type=float, default=0.1, help="p for F_life by Eq. 1 (default 0.1)")
    p.add_argument("--plan", default=None, metavar="FILE", help="also evaluate the cascade `bicascade plan` chose")
    p.add_argument("--labels", default=None, metavar="FILE", help=LABELS)
    p.add_argument("--device", default=None)

    p = command("index", cmd_index, "embed a corpus with the ladder's cheapest level into LanceDB (resumable)")
    p.add_argument("source", help="folder, parquet (bytes or paths), or webdataset .tar shards; local or s3://...")
    p.add_argument("--db", required=True, help="LanceDB URI (folder or s3://bucket/path)")
    p.add_argument("--ladder", default=None, help="ladder whose level 0 embeds the corpus (required for a new "
                                                  "database; later runs default to the one it remembers)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--ann-min-rows", type=int, default=100_000,
                   help="build level 0's ANN index from this many rows (default 100000; below, exact search)")
    p.add_argument("--sync", action="store_true", help="a folder: also remove the images of files gone from it and "
                                                       "re-read files that changed (a served database sees it)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="sync again every SECONDS until Ctrl-C (implies --sync; with --json one JSON line per pass)")

    p = command("search", cmd_search, "one cascaded query in process (no server); writes computed embeddings back")
    p.add_argument("text", nargs="?", help="what to look for (or --image)")
    p.add_argument("--image", default=None, metavar="PATH", help="search by this picture instead of text")
    p.add_argument("--db", required=True, help="LanceDB URI indexed by `bicascade index`")
    p.add_argument("--ladder", default=None, help="default: the ladder the database was indexed with")
    p.add_argument("--m", type=_ints, default=None, help=cutoffs)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--depth", type=int, default=None, help="levels of the cascade to run (default all; 1: level 0)")
    p.add_argument("--mode", choices=("semantic", "keyword", "hybrid"), default="semantic",
                   help="keyword: captions, paths and metadata (BM25); hybrid: both lists fused by rank")
    p.add_argument("--where", type=_where, default=None, metavar="JSON", help=where)
    p.add_argument("--device", default=None)

    p = command("remove", cmd_remove, "remove images from every table: images, level 0 (and its ANN index's "
                                      "results) and every level's cache")
    p.add_argument("ids", nargs="*", help="image ids (as search prints them)")
    p.add_argument("--db", required=True)
    p.add_argument("--uri-prefix", default=None, help="every image indexed from a uri starting with this")
    p.add_argument("--where", type=_where, default=None, metavar="JSON", help=where)

    p = command("serve", cmd_serve, "serve the cascade over HTTP with Ray Serve until Ctrl-C", json_out=False)
    p.add_argument("--db", required=True, help="LanceDB URI indexed by `bicascade index`")
    p.add_argument("--ladder", default=None, help="default: the ladder the database was indexed with")
    p.add_argument("--m", type=_ints, default=None, help=cutoffs)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-inflight", type=int, default=64,
                   help="searches in flight per ingress replica before answering 503 + Retry-After (default 64)")
    p.add_argument("--api-key-file", default=None,
                   help="turn on API keys: a file of `KEY [read|admin]` lines (or set $BICASCADE_API_KEYS); every "
                        "route but /healthz then needs Authorization: Bearer KEY")
    p.add_argument("--rate", type=float, default=200.0,
                   help="requests per second per client (per key, or per address without keys); 0: no limit")
    p.add_argument("--burst", type=float, default=400.0, help="the rate limit's bucket size (default 400)")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (on 127.0.0.1) with a local cluster")
    p.add_argument("--plan", default=None, metavar="FILE", help="serve the cascade `bicascade plan --json` chose")
    p.add_argument("--replicas", type=_counts, default=None, metavar="NAME=N,...",
                   help="fixed replica counts instead of autoscaling, e.g. Api=3,Encoder2=2")
    p.add_argument("--group-gflops", type=float, default=1.0, metavar="G",
                   help="levels cheaper than G GFLOPs per image share one Encoder deployment (default 1; 0: one "
                        "deployment per level)")
    p.add_argument("--direct", action="store_true",
                   help="one node, fastest: the ingress replica answers HTTP itself, with no Serve proxy in between "
                        "(about 3x the searches/s on 2 cores); one ingress replica, a local cluster only, and a "
                        "migration is served after a restart")

    def stream_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", required=True, help="LanceDB URI with the held-out images indexed")
        p.add_argument("--ladder", default=None, help="default: the ladder the database was indexed with")
        p.add_argument("--world", default=None, help="world directory (default: the one the database indexed)")
        p.add_argument("--p", type=float, default=0.1, help="fraction of the corpus the stream touches (default 0.1)")
        p.add_argument("--queries", type=int, default=10_000, help="queries in the stream (default 10000)")
        p.add_argument("--device", default=None)

    p = command("simulate", cmd_simulate, "replay a p-small-world query stream; measured F_life, recall and latency "
                                          "vs Eq. 1 / Eq. 2, with a report of plots")
    stream_args(p)
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of topic popularity (default 1.0)")
    p.add_argument("--cascade", type=_names, default=None, help="model names, cheapest first (default the ladder)")
    p.add_argument("--m", type=_ints, default=None, help=cutoffs)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="also replay against this running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight with --url (default 8)")
    p.add_argument("--sweep", type=_floats, default=None,
                   help="also replay the cascade at each of these p, e.g. 0.01,0.05,0.1,0.2,0.5")
    p.add_argument("--report", default=None, help="write plots and summary.md to this directory")

    p = command("plan", cmd_plan, "the quality-cost frontier of the ladder's cascades (fixed and adaptive cutoffs) "
                                  "and the cheapest within a recall budget; `serve --plan FILE` serves it")
    stream_args(p)
    p.add_argument("--recall-loss", type=float, default=0.5, help="recall points the cascade may lose (default 0.5)")
    p.add_argument("--at", type=int, choices=(1, 5, 10), default=10,
                   help="the recall@K of the budget and the frontier (default 10; where every level finds nearly "
                        "all at 10, as on the demo world, R@1 is what tells them apart)")
    p.add_argument("--labels", default=None, metavar="FILE", help=LABELS)
    p.add_argument("--report", default=None, help="write frontier.png here")

    p = command("verify", cmd_verify, "check a database's invariants (exit 1 and a report when one is broken)")
    p.add_argument("--db", required=True)
    p.add_argument("--repair", action="store_true", help="remove duplicates, orphans and broken vectors; index what "
                                                         "the ANN index misses")

    p = command("migrate", cmd_migrate, "move a database to another ladder: new levels get their own cache tables "
                                        "(filled by queries, or now with --warm); a new level 0 is built beside the "
                                        "old one; a running `bicascade serve` switches once it is recorded")
    p.add_argument("--db", required=True)
    p.add_argument("--ladder", required=True, help="the ladder to move to")
    p.add_argument("--warm", action="store_true", help="embed, for each new level, the images the level it replaces "
                                                       "had cached (a Ray job)")

    p = command("cache", cmd_cache_drop, "cache tables: `bicascade cache drop --db D [FINGERPRINT ...]` drops those "
                                         "the recorded ladder no longer uses")
    p.add_argument("action", choices=["drop"])
    p.add_argument("fingerprints", nargs="*", help="default: every table the recorded ladder does not use")
    p.add_argument("--db", required=True)

    p = command("demo", cmd_demo, "everything end to end on the embedded default world")
    p.add_argument("--ladder", default="synthetic", help="ladder profile (default synthetic; synthetic-tiny is quick)")
    p.add_argument("--workdir", default="work", help="where the world, the db and reports go (default ./work)")
    p.add_argument("--no-serve", action="store_true", help="stop after the report instead of serving")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Root at ERROR hides third-party chatter; our own logger speaks at INFO.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from bicascade.errors import BicascadeError

    try:
        return args.func(args) or 0
    except BicascadeError as e:  # the user's to fix: one line; anything else is a bug and keeps its traceback
        print(f"bicascade {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
