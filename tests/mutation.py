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
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider --timeout 60"
# module -> the fast tests that cover it (their served and Ray-backed tests cover it too, at minutes a run)
TARGETS = {
    "cascade": ("bicascade/cascade.py", "tests/test_cascade.py tests/test_plan.py "
                                        "tests/test_evaluate.py::test_cascade_topk_equals_algorithm_1"),
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
    lines = module_lines(module)
    killed, survivors, other = 0, [], 0
    for line in dump.stdout.splitlines():
        job, result = json.loads(line)
        outcome = (result or {}).get("test_outcome")
        if outcome == "killed":
            killed += 1
        elif outcome == "survived":
            m = job["mutations"][0]
            row = m["start_pos"][0]
            survivors.append({"line": row, "operator": m["operator_name"].split("/")[-1],
                              "occurrence": m["occurrence"], "code": lines[row - 1].strip()[:100]})
        else:  # incompetent (the mutant does not import) or not run
            other += 1
    total = killed + len(survivors)
    return {"module": module, "tests": tests, "mutants": total + other, "killed": killed, "survived": len(survivors),
            "not_scored": other, "score": round(killed / total, 3) if total else None,
            "minutes": round((time.monotonic() - t0) / 60, 1), "survivors": sorted(survivors, key=lambda s: s["line"])}


def module_lines(module: str) -> list[str]:
    return (ROOT / module).read_text().splitlines()


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
