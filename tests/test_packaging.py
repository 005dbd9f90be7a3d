"""The built wheel carries every subpackage under `bicascade.` and nothing named serve/storage at top level."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, timeout=300, cwd=tmp_path)
    names = zipfile.ZipFile(next(tmp_path.glob("bicascade-*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("bicascade-")}
    assert tops == {"bicascade"}
    for sub in ("pipelines", "pipelines/ingest", "pipelines/measure", "pipelines/lab", "serve", "actors", "storage"):
        assert f"bicascade/{sub}/__init__.py" in names
    assert "bicascade/model_configs/bc-test-vit.json" in names
    assert "bicascade/cli.py" in names and "bicascade/pipelines/demo.py" in names
    assert "bicascade/pipelines/ingest/index.py" in names and "bicascade/serve/config.yaml" in names
    assert {f"bicascade/serve/page/{f}" for f in ("index.html", "app.js", "style.css")} <= set(names)  # the page
