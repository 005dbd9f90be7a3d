"""serve/config.yaml as data: the one file `bicascade serve`, `serve deploy` and the KubeRay manifests start from.
YAML only: no Ray, no torch, so what only reads it starts fast."""
from __future__ import annotations

from pathlib import Path

import yaml

CONFIG_YAML = Path(__file__).with_name("config.yaml")


def document() -> dict:
    return yaml.safe_load(CONFIG_YAML.read_text())


def shipped_app() -> dict:
    """The application entry: one source for `bicascade serve` and `serve deploy`."""
    return document()["applications"][0]


def deployment_options() -> dict[str, dict]:
    """Per-deployment options (autoscaling, queue bounds, resources)."""
    return {d.pop("name"): d for d in shipped_app()["deployments"]}


def runtime_env() -> dict:
    """The app's runtime_env, which `bicascade serve` gives its Ray job."""
    return shipped_app().get("runtime_env", {})
