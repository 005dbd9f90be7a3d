"""KubeRay manifests, generated rather than hand-kept: a RayService that serves a database from object storage (its
serveConfigV2 is serve/config.yaml with the database, API keys and GPU shares filled in) and a RayJob that indexes
a source into it. Written from KubeRay's v1 API documentation (ray.io/v1: RayService, RayJob, RayClusterSpec with a
head group and worker groups of pod templates). The cluster is reached only through the ClusterIP Service KubeRay
makes for Serve (`<name>-serve-svc`, port 8000); every request needs a key."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

from bicascade import __version__
from bicascade.serve import config

KEYS_DIR = "/etc/bicascade"  # the API keys Secret, mounted read-only in every Ray pod


@dataclass(frozen=True)
class Cluster:
    db: str = "s3://my-bucket/bicascade/db"
    source: str = "s3://my-bucket/photos/"  # what the RayJob indexes
    ladder: str = "openclip-vit"
    name: str = "bicascade"
    image: str = f"bicascade:{__version__}"  # deploy/Dockerfile: this package on Ray's CUDA image
    gpu_workers: int = 2  # the most GPU pods; each holds Encoder replicas of every level
    gpu_share: float = 0.25  # of a GPU per Encoder replica
    cpu_workers: int = 4  # the most CPU pods: ingress replicas and cache writers
    s3_secret: str = "bicascade-s3"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and AWS_ENDPOINT...)
    keys_secret: str = "bicascade-api-keys"  # one file, `keys`: `KEY [read|admin]` lines


def serve_config(c: Cluster) -> dict:
    """serve/config.yaml for the cluster: the pods' network (KubeRay's Service reaches the proxies there), the
    database, the keys file, and a GPU share for each Encoder."""
    doc = config.document()
    doc["http_options"]["host"] = "0.0.0.0"  # inside the pod network only: the ClusterIP Service is the way in
    app = doc["applications"][0]
    app["args"].update(db=c.db, api_keys=f"{KEYS_DIR}/keys")
    app["runtime_env"].pop("worker_process_setup_hook")  # binds gRPC to loopback: for one machine, not pods
    for d in app["deployments"]:
        if d["name"].startswith("Encoder"):
            d["ray_actor_options"] = {"num_cpus": 1, "num_gpus": c.gpu_share}
    return doc


def _container(c: Cluster, name: str, cpu: int, memory: str, gpus: int = 0, ports: dict | None = None) -> dict:
    limits = {"cpu": str(cpu), "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {"name": name, "image": c.image, "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": dict(limits), "limits": limits},
            "envFrom": [{"secretRef": {"name": c.s3_secret}}],
            "ports": [{"containerPort": p, "name": n} for n, p in (ports or {}).items()],
            "volumeMounts": [{"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True}]}


def _pod(c: Cluster, container: dict, gpu: bool = False) -> dict:
    spec = {"containers": [container], "volumes": [{"name": "api-keys", "secret": {"secretName": c.keys_secret}}]}
    if gpu:  # GPU nodes are usually tainted for GPU work only
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def ray_cluster(c: Cluster, gpu_min: int) -> dict:
    """A RayClusterSpec: a head that runs no replicas (Serve's controller, GCS) and worker groups for CPU work and
    for the Encoders' GPUs, scaled by Ray's autoscaler between their bounds."""
    head = _container(c, "ray-head", 4, "16Gi", ports={"gcs-server": 6379, "dashboard": 8265, "client": 10001,
                                                        "serve": 8000})
    cpu = _container(c, "ray-worker", 8, "32Gi")
    gpu = _container(c, "ray-worker", 8, "64Gi", gpus=1)
    return {"rayVersion": ray.__version__, "enableInTreeAutoscaling": True,
            "headGroupSpec": {"serviceType": "ClusterIP", "rayStartParams": {"num-cpus": "0"},
                              "template": _pod(c, head)},
            "workerGroupSpecs": [
                {"groupName": "cpu", "replicas": 1, "minReplicas": 1, "maxReplicas": c.cpu_workers,
                 "rayStartParams": {}, "template": _pod(c, cpu)},
                {"groupName": "gpu", "replicas": gpu_min, "minReplicas": gpu_min, "maxReplicas": c.gpu_workers,
                 "rayStartParams": {}, "template": _pod(c, gpu, gpu=True)}]}


def rayservice(c: Cluster) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": c.name, "labels": {"app.kubernetes.io/name": "bicascade"}},
            "spec": {"serveConfigV2": yaml.safe_dump(serve_config(c), sort_keys=False),
                     "rayClusterConfig": ray_cluster(c, gpu_min=1)}}


def rayjob(c: Cluster) -> dict:
    """Indexing as a RayJob: a cluster of its own, deleted when the (resumable) job finishes."""
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"{c.name}-index", "labels": {"app.kubernetes.io/name": "bicascade"}},
            "spec": {"entrypoint": f"bicascade index {c.source} --db {c.db} --ladder {c.ladder}",
                     "submissionMode": "K8sJobMode", "shutdownAfterJobFinishes": True,
                     "ttlSecondsAfterFinished": 600, "rayClusterSpec": ray_cluster(c, gpu_min=c.gpu_workers)}}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, readable as the Serve config they are."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s
                                                              else None))


def manifests(c: Cluster, command: str = "bicascade kuberay") -> dict[str, str]:
    """File name -> text, each saying the command that made it."""
    head = f"# generated by `{command}`: change the command, not this file\n"
    return {name: head + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)
            for name, doc in (("rayservice.yaml", rayservice(c)), ("rayjob-index.yaml", rayjob(c)))}


def write(c: Cluster, out: str | Path, command: str = "bicascade kuberay") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in manifests(c, command).items():
        paths.append(out / name)
        paths[-1].write_text(text)
    return paths
