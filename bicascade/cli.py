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


def cmd_demo(args: argparse.Namespace) -> None:
    from bicascade.pipelines import demo

    doc = demo.run(workdir=args.workdir, serve=not args.no_serve)
    emit(args, doc, demo.format_summary)


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

    p = sub.add_parser("demo", help="everything end to end on the embedded default world")
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
