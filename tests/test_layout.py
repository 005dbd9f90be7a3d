"""The package map holds: imports flow one way (docs/ARCHITECTURE.md), the query core needs no Ray, one image path."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"bicascade": "bicascade", "pipelines": "bicascade.pipelines", "serve": "bicascade.serve",
           "actors": "bicascade.actors", "storage": "bicascade.storage"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module != "bicascade":  # `from bicascade import query` imports the module, not the front door
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p) if i in mods or i.split(".")[0] in ("ray", "lancedb")} for m, p in mods.items()}


def test_pipelines_never_import_actors_serve_or_the_cli():
    for mod, deps in graph().items():
        if mod.startswith("bicascade.pipelines"):
            bad = {d for d in deps if d.startswith(("bicascade.actors", "bicascade.serve", "bicascade.cli"))}
            assert not bad, f"{mod} imports {bad}"


def test_the_lab_is_reached_only_from_lab_commands():
    """Indexing, serving, search and the Python API never import the lab (training, worlds, sample photos); only the
    demo, the measurements and the CLI's lab commands (train, eval, ladders' catalog) do."""
    lab_users = {"bicascade.pipelines.demo", "bicascade.pipelines.measure.evaluate", "bicascade.cli"}
    for mod, deps in graph().items():
        if not mod.startswith("bicascade.pipelines.lab") and mod not in lab_users:
            assert not {d for d in deps if d.startswith("bicascade.pipelines.lab")}, f"{mod} imports the lab"
    cli = ast.parse((ROOT / "bicascade/cli.py").read_text())
    for fn in (n for n in cli.body if isinstance(n, ast.FunctionDef)):
        if fn.name not in ("cmd_ladders", "cmd_train", "cmd_eval", "cmd_demo"):
            assert "bicascade.pipelines.lab" not in imports_of(fn), f"cli.{fn.name} imports the lab"


def imports_of(tree: ast.AST) -> set[str]:
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_the_query_core_imports_no_ray_and_only_storage_imports_lancedb():
    g = graph()
    core = [m for m in g if m in ("bicascade.query", "bicascade.cascade", "bicascade.protocol", "bicascade.levels",
                                  "bicascade.models", "bicascade.costs", "bicascade.images", "bicascade.ladders",
                                  "bicascade.errors", "bicascade.kinds", "bicascade.patches",
                                  "bicascade.registry", "bicascade.capacity")
            or m.startswith(("bicascade.storage", "bicascade.pipelines.measure"))]
    for mod in core:
        assert not {d for d in g[mod] if d.split(".")[0] == "ray"}, f"{mod} imports ray"
    for mod, deps in g.items():
        if any(d.split(".")[0] == "lancedb" for d in deps):
            assert mod.startswith("bicascade.storage"), f"{mod} imports lancedb"


def test_lower_layers_never_import_higher_ones():
    order = ["bicascade", "bicascade.model_configs", "bicascade.errors", "bicascade.levels", "bicascade.kinds",
             "bicascade.patches", "bicascade.registry", "bicascade.images", "bicascade.models",
             "bicascade.cascade", "bicascade.costs",
             "bicascade.ladders", "bicascade.capacity", "bicascade.storage", "bicascade.protocol", "bicascade.query",
             "bicascade.actors",
             "bicascade.pipelines", "bicascade.serve", "bicascade.collection", "bicascade.cli"]

    def layer(mod: str) -> int:
        if mod == "bicascade":  # the package's own module is the front door (bicascade.open): above everything
            return len(order)
        return max(i for i, prefix in enumerate(order) if mod == prefix or mod.startswith(prefix + "."))
    for mod, deps in graph().items():
        for dep in deps:
            if dep.startswith("bicascade.") or (dep == "bicascade" and mod != "bicascade"):
                assert layer(dep) <= layer(mod), f"{mod} (layer {order[layer(mod)]}) imports {dep}"


def test_files_become_pixels_in_one_place():
    files = [*modules().values(), *(ROOT / "bench").glob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in files if "Image.open(" in p.read_text()]
    assert offenders == ["bicascade/images.py"], offenders


def test_in_process_search_imports_no_ray():
    """What `bicascade search` imports, checked in a fresh interpreter where `import ray` fails."""
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` now raises ImportError
            "from bicascade import cli, query\n"
            "from bicascade.pipelines.measure import evaluate, simulate\n"
            "cli.build_parser()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("module", "allowed"), [
    ("bicascade.cli", ()),  # --help is instant
    # the ingress (and its cascade) runs no model: a replica that imported torch and open_clip paid ~3 s of CPU at start
    ("bicascade.serve.app", ("lancedb", "ray")),
    ("bicascade.serve.kuberay", ("ray",))])  # writing manifests loads no model
def test_heavy_imports_stay_where_they_are_used(module, allowed):
    heavy = ("torch", "open_clip", "ray", "lancedb")
    code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == str(sorted(allowed)), r.stdout + r.stderr
