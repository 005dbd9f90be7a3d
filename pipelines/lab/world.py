"""The synthetic world: deterministic captioned scenes written as a user's corpus (image files + captions parquet).

Scenes hold 1-3 objects (shape, colour, size, texture) in a row or a column. Captions bind every attribute to
its object and name the arrangement, so retrieving the right image among near-duplicates (one attribute or
one relation changed) takes exactly the binding that separates a large CLIP from a small one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger("bicascade")

SHAPES = ["circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring"]
COLOURS = {"red": (215, 40, 40), "orange": (240, 140, 25), "yellow": (230, 215, 40), "green": (40, 165, 60),
           "cyan": (45, 200, 210), "blue": (40, 70, 210), "purple": (135, 60, 190), "pink": (240, 125, 185)}
SIZES = ["small", "large"]
TEXTURES = ["plain", "striped"]
SPOTS = ["on the left", "on the right", "at the top", "at the bottom", "in the centre"]
SPLITS = ("train", "val", "test")
# Detail that only resolution shows, so that a ladder of encoders at rising input sizes is ordered by what they can
# see, not by what training left unlearned: small objects, and mean-preserving stripes of STRIPE canvas pixels (the
# canvas is twice the image size: at 96 px a stripe period is 2 px, at 64 px it aliases away, at 32 px so do the
# shapes of small objects).
SMALL = 0.06  # radius of a small object, as a fraction of the canvas (large: 0.15)
STRIPE = 2


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 96
    train: int = 30000
    val: int = 2000
    test: int = 5000
    group: int = 5  # scenes come in groups of near-duplicates: a base scene and (group - 1) one-edit variants
    supersample: int = 2  # drawn at this multiple of the size, then downsampled (1: 4x faster, for huge corpora)
    version: int = 3  # bump when the generator changes: caches of worlds and checkpoints key on this config

    def digest(self) -> str:
        doc = asdict(self)
        if doc["supersample"] == 2:  # worlds drawn before the option existed keep their digest (and checkpoints)
            del doc["supersample"]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


# An object is (shape, colour, size, texture); a scene is (layout, objects) with layout "row" | "column" | spot.
Obj = tuple[str, str, str, str]
Scene = tuple[str, tuple[Obj, ...]]


def random_obj(rng: np.random.Generator) -> Obj:
    return (SHAPES[rng.integers(8)], list(COLOURS)[rng.integers(8)], SIZES[rng.integers(2)],
            TEXTURES[rng.integers(2)])


def random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    objs = tuple(random_obj(rng) for _ in range(n))
    layout = SPOTS[rng.integers(5)] if n == 1 else ("row" if n == 3 or rng.random() < 0.5 else "column")
    return layout, objs


def edit_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A near-duplicate: one attribute of one object, the order of two objects, or the arrangement changed."""
    layout, objs = scene
    kinds = ["attr"] * 4 + (["swap"] if len(objs) > 1 and objs[0] != objs[1] else []) + ["layout"]
    kind = kinds[rng.integers(len(kinds))]
    if kind == "swap":
        i, j = rng.choice(len(objs), 2, replace=False)
        objs = list(objs)
        objs[i], objs[j] = objs[j], objs[i]
        return layout, tuple(objs)
    if kind == "layout":
        choices = ([s for s in SPOTS if s != layout] if len(objs) == 1
                   else ["row", "column"] if len(objs) == 2 else ["row"])
        other = [c for c in choices if c != layout]
        if other:
            return other[rng.integers(len(other))], objs
    i = rng.integers(len(objs))
    a = rng.integers(4)
    values = [SHAPES, list(COLOURS), SIZES, TEXTURES][a]
    obj = list(objs[i])
    obj[a] = [v for v in values if v != obj[a]][rng.integers(len(values) - 1)]
    return layout, objs[:i] + (tuple(obj),) + objs[i + 1:]


def phrase(obj: Obj, rng: np.random.Generator) -> str:
    shape, colour, size, texture = obj
    tex = "" if texture == "plain" and rng.random() < 0.5 else texture + " "
    return f"a {size} {tex}{colour} {shape}" if rng.random() < 0.5 else f"a {size} {colour} {tex}{shape}"


def captions(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    """`n` paraphrases, each naming every attribute of every object and the arrangement."""
    layout, objs = scene
    out: list[str] = []
    for t in range(n):
        p = [phrase(o, rng) for o in objs]
        if len(objs) == 1:
            text = [f"{p[0]} {layout}", f"{layout}, {p[0]}", f"there is {p[0]} {layout}"][t % 3]
        elif len(objs) == 2 and layout == "row":
            text = [f"{p[0]} to the left of {p[1]}", f"{p[1]} to the right of {p[0]}",
                    f"from left to right: {p[0]} and {p[1]}"][t % 3]
        elif len(objs) == 2:
            text = [f"{p[0]} above {p[1]}", f"{p[1]} below {p[0]}", f"{p[0]} on top and {p[1]} underneath"][t % 3]
        else:
            text = [f"from left to right: {p[0]}, {p[1]} and {p[2]}", f"{p[1]} between {p[0]} and {p[2]}",
                    f"{p[0]}, then {p[1]}, then {p[2]}, left to right"][t % 3]
        out.append(text.replace("plain", "solid") if t % 2 else text)
    return out


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(k: int, radii: list[float], phase: float = 0.0) -> list[tuple[float, float]]:
        return [(cx + radii[i % len(radii)] * np.cos(phase + rot + 2 * np.pi * i / k),
                 cy + radii[i % len(radii)] * np.sin(phase + rot + 2 * np.pi * i / k)) for i in range(k)]
    if shape == "square":
        return ring(4, [r * 1.2], np.pi / 4)
    if shape == "triangle":
        return ring(3, [r * 1.25], -np.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r * 1.25), (cx + r * 0.8, cy), (cx, cy + r * 1.25), (cx - r * 0.8, cy)]
    if shape == "hexagon":
        return ring(6, [r * 1.1])
    if shape == "star":
        return ring(10, [r * 1.3, r * 0.55], -np.pi / 2)
    if shape == "cross":
        a, b = r * 1.1, r * 0.38
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
        c, s = np.cos(rot), np.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise AssertionError(shape)


def render(scene: Scene, size: int, rng: np.random.Generator, supersample: int = 2) -> Image.Image:
    """Draw at `supersample`x and downsample (anti-aliasing), with jittered colours, sizes, positions, rotation and
    noise."""
    s = supersample * size
    layout, objs = scene
    bg = np.clip(rng.normal(128, 22) + rng.normal(0, 10, 3), 60, 190)
    canvas = np.empty((s, s, 3), np.float32)
    canvas[:] = bg
    # a faint gradient so the background is not a constant
    canvas += np.linspace(-1, 1, s)[:, None, None] * rng.normal(0, 12, 3)
    n = len(objs)
    for i, (shape, colour, sz, texture) in enumerate(objs):
        r = s * (0.15 if sz == "large" else SMALL) * rng.uniform(0.9, 1.1)
        if n == 1:
            cx, cy = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
                      "at the bottom": (0.5, 0.75), "in the centre": (0.5, 0.5)}[layout]
        else:
            along, across = (i + 0.5) / n, 0.5 + rng.uniform(-0.12, 0.12)
            cx, cy = (along, across) if layout == "row" else (across, along)
        cx, cy = (cx + rng.uniform(-0.04, 0.04)) * s, (cy + rng.uniform(-0.04, 0.04)) * s
        mask_img = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(mask_img)
        rot = rng.uniform(-0.3, 0.3)
        if shape in ("circle", "ring"):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            if shape == "ring":
                draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
        else:
            draw.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
        # blend only inside the object's box: outside it the mask is 0 and the canvas stays as it is (the same pixels
        # as blending everywhere, at a tenth of the work)
        x0, y0, x1, y1 = mask_img.getbbox() or (0, 0, 0, 0)
        mask = np.asarray(mask_img.crop((x0, y0, x1, y1)), np.float32)[..., None] / 255
        rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 12, 3), 0, 255)
        fill = np.broadcast_to(rgb, mask.shape[:2] + (3,)).copy()
        if texture == "striped":  # fine and mean-preserving: at a third of the resolution it averages to plain
            yy, xx = np.mgrid[y0:y1, x0:x1]
            stripes = ((xx + yy + rng.integers(2 * STRIPE)) // STRIPE) % 2 == 0
            depth = 0.8 * np.minimum(rgb, 255 - rgb)
            fill[stripes] -= depth
            fill[~stripes] += depth
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - mask) + fill * mask
    small = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    noisy = np.asarray(small, np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def scene_key(scene: Scene) -> str:
    return json.dumps(scene)


def scene_splits(cfg: WorldConfig) -> dict[str, list[Scene]]:
    """Every split's scenes, distinct within and across splits, in groups of near-duplicates (a base scene and
    its one-edit variants, consecutive): the test pool is hard, and whole groups in a training batch are the hard
    negatives that teach binding."""
    rng = np.random.default_rng([cfg.seed, 1])
    seen: set[str] = set()

    def fresh(make) -> Scene:
        while True:
            scene = make()
            if scene_key(scene) not in seen:
                seen.add(scene_key(scene))
                return scene

    def grouped(n: int) -> list[Scene]:
        out: list[Scene] = []
        while len(out) < n:
            base = fresh(lambda: random_scene(rng))
            members, size = [base], min(cfg.group, n - len(out))
            for _ in range(100):  # a base whose one-edit neighbours are used up is dropped for a new one
                if len(members) == size:
                    break
                variant = edit_scene(base, rng)
                if scene_key(variant) not in seen:
                    seen.add(scene_key(variant))
                    members.append(variant)
            if len(members) == size:
                out += members
        return out

    return {"test": grouped(cfg.test), "val": grouped(cfg.val), "train": grouped(cfg.train)}


def _write_one(args: tuple) -> tuple[str, list[str]]:
    root, split, i, scene, cfg_seed, size, supersample = args
    rng = np.random.default_rng([cfg_seed, SPLITS.index(split) + 2, i])
    image = render(scene, size, rng, supersample)
    rel = f"{split}/{i:06d}." + ("png" if i % 10 == 9 else "jpg")  # mixed formats, like real corpora
    path = Path(root) / rel
    image.save(path, quality=92) if rel.endswith("jpg") else image.save(path)
    return rel, captions(scene, 3, rng)


def complete(root: str | Path, cfg: WorldConfig) -> bool:
    """Whether `root` holds a whole world of this config (its marker is written last)."""
    marker = Path(root) / "world.json"
    return marker.exists() and json.loads(marker.read_text()).get("digest") == cfg.digest()


def make_world(root: str | Path, cfg: WorldConfig = WorldConfig(), workers: int = 2) -> Path:
    """Write the world under `root` (idempotent: a complete world with the same config is reused)."""
    root = Path(root)
    if complete(root, cfg):
        return root
    scenes = scene_splits(cfg)
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), split, i, scene, cfg.seed, cfg.image_size, cfg.supersample)
            for split in SPLITS for i, scene in enumerate(scenes[split])]
    rows: dict[str, list] = {"uri": [], "caption": [], "split": [], "image": [], "group": []}
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(_write_one, jobs, chunksize=256)
        for job, (rel, caps) in tqdm(zip(jobs, results), total=len(jobs), desc="world", unit="img", mininterval=2):
            _, split, i = job[:3]
            for c in caps:
                rows["uri"].append(rel)
                rows["caption"].append(c)
                rows["split"].append(split)
                rows["image"].append(i)
                rows["group"].append(i // cfg.group)
    pq.write_table(pa.table(rows), root / "captions.parquet")
    (root / "world.json").write_text(json.dumps({"digest": cfg.digest(), "config": asdict(cfg)}, indent=2))
    log.info("world written to %s: %s", root, {s: len(v) for s, v in scenes.items()})
    return root


def load_split(root: str | Path, split: str) -> tuple[list[str], list[list[str]]]:
    """(image paths, captions per image) of one split, in image order."""
    root = Path(root)
    table = pq.read_table(root / "captions.parquet", filters=[("split", "=", split)]).to_pydict()
    caps: dict[int, list[str]] = {}
    uris: dict[int, str] = {}
    for uri, cap, i in zip(table["uri"], table["caption"], table["image"]):
        caps.setdefault(i, []).append(cap)
        uris[i] = str(root / uri)
    order = sorted(uris)
    return [uris[i] for i in order], [caps[i] for i in order]


def tiny(cfg: WorldConfig = WorldConfig()) -> WorldConfig:
    """A world small enough for tests."""
    return replace(cfg, image_size=32, train=1500, val=100, test=300)
