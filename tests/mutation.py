"""Mutation testing (cosmic-ray) of the query core, the cache and the filters against the tests that cover them: each
mutant (an operator swapped, a comparison flipped, a constant changed, ...) is written into the source, the tests run,
and a mutant the tests still pass on "survived": a change of behaviour nothing checks. `make mutation`; not part of
`make test` (it takes tens of minutes). Prints JSON: the score per module and every survivor.

    python tests/mutation.py [--only cascade] [--out bench/results/mutation.json]

cosmic-ray edits the files in place and restores each one after its mutant; this script refuses to start on a file
with uncommitted changes and restores the files from git when it ends, however it ends.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one run per mutant: the plugins this suite does not need here cost 2 s of a 0.7 s run
PYTEST = (f"{sys.executable} -m pytest -x -q --timeout 60 -p no:cacheprovider -p no:schemathesis "
          "-p no:hypothesispytest -p no:anyio")
# module -> the fast tests that cover it (the served and Ray-backed tests cover it too, at minutes a run)
TARGETS = {
    "cascade": ("bicascade/cascade.py", "tests/test_cascade.py"),
    "cache": ("storage/cache.py", "tests/test_cache.py"),
    "filters": ("storage/filters.py", "tests/test_filters.py"),
}
CONFIG = """[cosmic-ray]
module-path = "{module}"
timeout = {timeout}
excluded-modules = []
test-command = "{command}"

[cosmic-ray.distributor]
name = "local"
"""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def run(name: str, module: str, tests: str, work: Path) -> dict:
    config, session = work / f"{name}.toml", work / f"{name}.sqlite"
    t0 = time.monotonic()
    baseline = subprocess.run(f"{PYTEST} {tests}", shell=True, cwd=ROOT, capture_output=True, text=True)
    if baseline.returncode:
        raise SystemExit(f"the tests of {module} fail unmutated:\n{baseline.stdout[-3000:]}")
    took = time.monotonic() - t0
    config.write_text(CONFIG.format(module=module, timeout=round(max(30.0, 10 * took)), command=f"{PYTEST} {tests}"))
    cr = Path(sys.executable).with_name("cosmic-ray")
    subprocess.run([str(cr), "init", str(config), str(session)], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([str(cr), "exec", str(config), str(session)], cwd=ROOT, check=True, capture_output=True)
    dump = subprocess.run([str(cr), "dump", str(session)], cwd=ROOT, check=True, capture_output=True, text=True)
    source = (ROOT / module).read_text()
    lines, inert = source.splitlines(), annotation_spans(source)
    killed, survivors, annotations, other = 0, [], 0, 0
    for line in dump.stdout.splitlines():
        job, result = json.loads(line)
        outcome = (result or {}).get("test_outcome")
        m = job["mutations"][0]
        if any(a <= tuple(m["start_pos"]) < b for a, b in inert):
            annotations += 1  # `X | None` -> `X + None` in an annotation: never evaluated, nothing can tell
        elif outcome == "killed":
            killed += 1
        elif outcome == "survived":
            row = m["start_pos"][0]
            survivors.append({"line": row, "operator": m["operator_name"].split("/")[-1],
                              "occurrence": m["occurrence"], "code": lines[row - 1].strip()[:100]})
        else:  # incompetent (the mutant does not import) or not run
            other += 1
    total = killed + len(survivors)
    return {"module": module, "tests": tests, "mutants": total + annotations + other, "killed": killed,
            "survived": len(survivors), "in_annotations": annotations, "not_scored": other,
            "score": round(killed / total, 3) if total else None, "minutes": round((time.monotonic() - t0) / 60, 1),
            "survivors": sorted(survivors, key=lambda s: s["line"])}


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every type annotation: with `from __future__ import annotations` they are strings
    Python never evaluates, so a mutant inside one is equivalent by construction and left out of the score."""
    if "from __future__ import annotations" not in source:
        return []
    spans = []
    for node in ast.walk(ast.parse(source)):
        notes = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            notes = [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
                     if a is not None and a.annotation is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            notes = [node.annotation]
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in notes if n is not None]
    return spans


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(TARGETS), action="append")
    p.add_argument("--out")
    a = p.parse_args()
    targets = {k: v for k, v in TARGETS.items() if not a.only or k in a.only}
    files = [m for m, _ in targets.values()]
    if git("status", "--porcelain", "--", *files).strip():
        sys.exit(f"uncommitted changes in {files}: commit or stash them first (the mutants are written into them)")
    results = []
    try:
        with tempfile.TemporaryDirectory() as work:
            for name, (module, tests) in targets.items():
                print(f"mutating {module} against {tests} ...", file=sys.stderr, flush=True)
                results.append(run(name, module, tests, Path(work)))
                r = results[-1]
                print(f"  {r['killed']}/{r['killed'] + r['survived']} killed ({r['score']}) in {r['minutes']} min",
                      file=sys.stderr, flush=True)
    finally:
        git("checkout", "--", *files)
    text = json.dumps({"modules": results}, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
