"""The app graph, built from serve/config.yaml and the database's ladder: one Encoder deployment per level and the HTTP
ingress over their handles, which runs the cascade itself. Only the process that builds it (`bicascade serve`,
or Serve's controller for `serve deploy`) resolves the ladder and imports the models; the replicas import only
what they run."""
from __future__ import annotations

import copy
import json
import math

import ray
from ray import serve

from bicascade import models
from bicascade.actors.encoder import Encoder
from bicascade.actors.router import RouterConfig
from bicascade.cascade import default_cutoffs, validate
from bicascade.errors import BadInputError, BicascadeError
from bicascade.levels import LevelInfo
from bicascade.query import open_ladder
from bicascade.serve.access import Keys
from bicascade.serve.app import Api, AppConfig
from bicascade.serve.config import deployment_options
from bicascade.storage import tables


def gpu_shares(gflops: list[float], gpus: float) -> list[float]:
    """A GPU fraction per Encoder replica of each level: the cluster's GPUs split by level cost, so the costliest
    level gets the most (each share between 0.05 and 1; replicas beyond what fits wait for the autoscaler)."""
    if gpus <= 0:
        return [0.0] * len(gflops)
    total = sum(gflops) or 1.0
    return [max(0.05, min(1.0, math.floor(100 * gpus * g / total) / 100)) for g in gflops]


def groups(infos: list[LevelInfo], below_gflops: float) -> list[list[int]]:
    """The levels each Encoder deployment serves: the cheap levels (under `below_gflops` per image) share one, every
    other level has its own. A replica process costs seconds of CPU to start (torch and open_clip), more than a tiny
    level computes in its life; a real one (ViT-B: 4.4 GFLOPs and up) gets its own replicas and autoscaling."""
    cheap = [j for j, info in enumerate(infos) if info.gflops < below_gflops]
    rest = [[j] for j in range(len(infos)) if j not in cheap]
    return sorted(([cheap] if len(cheap) > 1 else [[j] for j in cheap]) + rest)


def encoder_options(opts: dict[str, dict], infos: list[LevelInfo], gpus: float, grouped: list[list[int]]
                    ) -> list[dict]:
    """Each Encoder deployment's options from serve/config.yaml (named for its first level; the deepest entry serves
    deeper ladders), with a GPU share added where the config names none and the cluster has GPUs."""
    deepest = opts[max(n for n in opts if n.startswith("Encoder"))]
    shares = gpu_shares([info.gflops for info in infos], gpus)
    out = []
    for levels in grouped:
        o = copy.deepcopy(opts.get(f"Encoder{levels[0]}", deepest))
        actor = o.setdefault("ray_actor_options", {})
        share = min(1.0, sum(shares[j] for j in levels))
        if share and "num_gpus" not in actor:
            actor["num_gpus"] = share
        out.append(o)
    return out


def build(config: AppConfig) -> serve.Application:
    """The app graph: an Encoder deployment per level (the cheap ones share one) and the HTTP ingress (with its
    Router) over their handles."""
    opts = deployment_options()
    for name, n in config.replicas.items():  # names are checked against the deployments once levels are grouped
        fixed = opts.setdefault(name, copy.deepcopy(opts[max(k for k in opts if k.startswith("Encoder"))]))
        fixed.pop("autoscaling_config", None)
        fixed["num_replicas"] = int(n)
    ladder = open_ladder(tables.Database(config.db), config.ladder)
    infos = ladder.levels
    margin = None
    if config.plan is not None:
        infos = [infos[j] for j in config.plan.levels(ladder.names)]
        config.cutoffs, margin = list(config.plan.cutoffs), config.plan.adaptive_margin
    for info in infos:  # a missing checkpoint or hub model fails here, not in a replica that Serve keeps restarting
        models.preflight(info.spec)
    cutoffs = list(config.cutoffs) if config.cutoffs is not None else list(default_cutoffs(len(infos)))
    validate(len(infos), cutoffs)
    keys = Keys.read(config.api_keys)  # a bad key file fails here, in one line
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    # specs, not names: a replica on another node needs no registry, only the checkpoint path
    grouped = groups(infos, config.group_gflops)
    served = {"Api", *(f"Encoder{levels[0]}" for levels in grouped)}
    if set(config.replicas) - served:
        raise BadInputError(f"replicas: no deployment {sorted(set(config.replicas) - served)} in this app "
                            f"({', '.join(sorted(served))}; levels under {config.group_gflops:g} GFLOPs share one)")
    encoders: list = [None] * len(infos)
    for levels, o in zip(grouped, encoder_options(opts, infos, gpus, grouped)):
        specs = [infos[j].spec for j in levels]
        handle = Encoder.options(name=f"Encoder{levels[0]}", **o).bind(specs if len(specs) > 1 else specs[0],
                                                                       config.db, config.encoder_threads)
        for j in levels:
            encoders[j] = handle
    router = RouterConfig(**{"margin": margin, **config.router})
    return Api.options(**opts["Api"]).bind(encoders, infos, cutoffs, ladder.name, config, router, keys)


def app_builder(args: dict) -> serve.Application:
    """`serve run bicascade.serve.build:app_builder db=...` and serve/config.yaml enter here."""
    if "cutoffs" in args and isinstance(args["cutoffs"], str):
        args = {**args, "cutoffs": json.loads(f"[{args['cutoffs']}]")}
    known = set(AppConfig.__dataclass_fields__)
    if set(args) - known:
        raise BicascadeError(f"unknown app args {sorted(set(args) - known)}; known: {sorted(known)}")
    return build(AppConfig(**args))
