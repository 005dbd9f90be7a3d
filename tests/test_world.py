"""The synthetic world: deterministic, captions bind every attribute, splits disjoint, near-duplicate groups."""
import hashlib
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq

from bicascade.pipelines.lab import world

CFG = replace(world.tiny(), train=60, val=10, test=40)


def digest(root):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.*")) if p.suffix != ".json"}


def test_deterministic_and_idempotent(tmp_path):
    a = world.make_world(tmp_path / "a", CFG)
    b = world.make_world(tmp_path / "b", CFG, workers=1)
    assert digest(a) == digest(b)
    mtime = (a / "captions.parquet").stat().st_mtime_ns
    world.make_world(a, CFG)  # complete world with the same config: reused
    assert (a / "captions.parquet").stat().st_mtime_ns == mtime
    assert digest(world.make_world(tmp_path / "c", replace(CFG, seed=1))) != digest(a)


def test_corpus_layout(tmp_path):
    root = world.make_world(tmp_path, CFG)
    table = pq.read_table(root / "captions.parquet").to_pydict()
    assert set(table) >= {"uri", "caption", "split"}
    assert {u.rsplit(".", 1)[1] for u in table["uri"]} == {"jpg", "png"}
    paths, caps = world.load_split(root, "test")
    assert len(paths) == 40 and all(len(c) == 3 for c in caps)
    assert all((root / p).exists() for p in paths)


def test_splits_disjoint_and_test_in_groups():
    plan = world.scene_splits(CFG)
    keys = {s: {world.scene_key(x) for x in v} for s, v in plan.items()}
    assert [len(keys[s]) for s in world.SPLITS] == [60, 10, 40]
    assert not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    test = plan["test"]
    for base, variant in zip(test[::5], test[1::5]):
        assert base != variant
        same_layout = base[0] == variant[0]
        if same_layout and len(base[1]) == len(variant[1]):
            diffs = sum(a != b for o1, o2 in zip(base[1], variant[1]) for a, b in zip(o1, o2))
            swapped = sorted(base[1]) == sorted(variant[1])
            assert diffs == 1 or swapped


def test_captions_name_every_attribute():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = world.random_scene(rng)
        for cap in world.captions(scene, 3, rng):
            for shape, colour, size, texture in scene[1]:
                assert shape in cap and colour in cap and size in cap
                if texture == "striped":
                    assert "striped" in cap
            if len(scene[1]) == 1:
                assert scene[0] in cap


def test_render_is_varied():
    rng = np.random.default_rng(0)
    scene = ("row", (("circle", "red", "large", "plain"), ("star", "blue", "small", "striped")))
    a = np.asarray(world.render(scene, 64, rng), np.float32)
    b = np.asarray(world.render(scene, 64, rng), np.float32)
    assert a.shape == (64, 64, 3) and np.abs(a - b).mean() > 1  # jitter and noise: no two renders alike


def test_default_plan_completes_in_whole_groups():
    cfg = world.WorldConfig()
    # single-object scenes run out of one-edit neighbours: bases are redrawn, never a hang
    plan = world.scene_splits(cfg)
    assert [len(plan[s]) for s in ("train", "val", "test")] == [cfg.train, cfg.val, cfg.test]
    assert all(len(plan[s]) % cfg.group == 0 for s in plan)


def test_renders_are_pinned_by_the_version():
    """Caches of worlds and checkpoints key on WorldConfig.version: the renders of version 3 must not change without
    a bump (this hash is of the whole-canvas blend the box-limited one replaced)."""
    cfg = replace(world.WorldConfig(), train=40, val=5, test=5)
    assert cfg.version == 3
    h = hashlib.sha256()
    for i, scene in enumerate(world.scene_splits(cfg)["train"]):
        h.update(np.asarray(world.render(scene, 96, np.random.default_rng(i))).tobytes())
    assert h.hexdigest()[:16] == "5614cc48954a61d4"
