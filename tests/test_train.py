"""Ladder training: cached by config hash, resumable after SIGKILL, same samples for every level."""
import dataclasses
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from bicascade import costs, models, registry
from bicascade.pipelines.lab import objectives, train, world

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from pathlib import Path
    from bicascade.pipelines.lab import objectives, train
    rng = np.random.default_rng(0)
    data = objectives.TrainData(rng.integers(0, 255, (256, 32, 32, 3), dtype=np.uint8), [["a b", "c d"]] * 256,
                                 group=4)
    data._tokens["bc-tiny-s"] = torch.from_numpy(rng.integers(1, 400, (256, 2, 32)))
    cfg = train.Schedule(samples=int(sys.argv[2]), batch_size=32, hard_groups=0.5)
    train.train_level("bc-tiny-s", data, cfg, objectives.Clip(), Path(sys.argv[1]), objectives.Context(device="cpu"),
                      save_every_s=0.0)
""")


def run_script(out, samples):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), str(samples)], stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref.pt"
    assert run_script(ref, 3200).wait(timeout=300) == 0
    out = tmp_path / "killed.pt"
    proc = run_script(out, 3200)
    state = out.with_suffix(".state")
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert state.exists() and not out.exists(), "the kill should land mid-training"
    assert torch.load(state, weights_only=True)["step"] < 100
    assert run_script(out, 3200).wait(timeout=300) == 0
    assert out.exists() and not state.exists()
    a, b = models.read_state_dict(ref), models.read_state_dict(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_tiny_ladder_cached_and_registered(monkeypatch):
    ladder, root = train.ensure_ladder("synthetic-tiny")
    assert ladder.levels == tuple(train.level_names(train.PROFILES["synthetic-tiny"]))
    flops = [costs.image_gflops(n) for n in ladder.levels]
    assert flops == sorted(flops) and len(set(flops)) == 3
    monkeypatch.setattr(train, "train_level", lambda *a, **k: pytest.fail("second run must reuse the cache"))
    again, _ = train.ensure_ladder("synthetic-tiny")
    assert again == ladder
    shutil.rmtree(root)  # a fully cached ladder does not need its world back (e.g. for indexing)
    assert train.ensure_ladder("synthetic-tiny", with_world=False) == (ladder, None) and not root.exists()
    registry._LADDERS.pop("synthetic-tiny")
    assert registry.get_ladder("synthetic-tiny").levels == ladder.levels  # persisted for other processes


@pytest.mark.slow
def test_shipped_weights_embed_the_world_as_trained_and_spare_a_fresh_clone_training(monkeypatch, tmp_path):
    shelf = tmp_path / "weights"
    monkeypatch.setattr(models, "WEIGHTS_DIR", shelf)
    shelf.mkdir()
    stale = shelf / "bc-tiny-s-0123456789abcdef.pt"  # what an older schedule shipped
    stale.write_bytes(b"old")
    ladder, root = train.ensure_ladder("synthetic-tiny")
    trained = [registry.get_model(n) for n in ladder.levels]
    shipped = train.ship("synthetic-tiny")
    assert [p.name for p in shipped] == [Path(s.checkpoint).name for s in trained] and not stale.exists()
    assert sorted(shelf.iterdir()) == sorted(shipped)
    assert all(p.stat().st_size < Path(s.checkpoint).stat().st_size / 2 for p, s in zip(shipped, trained))

    monkeypatch.setenv("BICASCADE_CACHE", str(tmp_path / "fresh-clone"))
    monkeypatch.setattr(train, "train_level", lambda *a, **k: pytest.fail("shipped weights must not be trained again"))
    again, _ = train.ensure_ladder("synthetic-tiny", with_world=False)
    assert again.levels == ladder.levels
    captions = [c for cs in world.load_split(root, "test")[1][:100] for c in cs]
    for before, name in zip(trained, again.levels):
        after = registry.get_model(name)
        assert Path(after.checkpoint).parent == shelf
        tokens = open_clip.get_tokenizer(after.arch)(captions)
        old, new = (models.build_model(s).eval() for s in (before, after))
        size = models.model_config(after.arch)["vision_cfg"]["image_size"]
        pixels = torch.rand(2, 3, size, size)
        with torch.no_grad():  # every caption of the world embeds exactly as trained, and so does every image
            assert torch.equal(old.encode_text(tokens), new.encode_text(tokens))
            assert torch.equal(old.encode_image(pixels), new.encode_image(pixels))
        rows = new.token_embedding.weight.abs().sum(1) > 0  # only the world's vocabulary is kept
        assert 10 < rows.sum() < 1000 and rows[tokens.unique()].all()


def test_a_fresh_clone_finds_the_default_ladder_shipped():
    """`make demo` reuses bicascade/weights/ instead of training for about 49 minutes: a change to the world, a model
    config or the schedule changes the digests and needs `make weights` (which also drops the old files)."""
    planned = train.checkpoints(train.PROFILES[train.SYNTHETIC], {})
    assert all(t.parent == models.WEIGHTS_DIR for t in planned.targets), [t.name for t in planned.targets]
    assert sorted(models.WEIGHTS_DIR.glob("*.pt")) == sorted(planned.targets)


def test_default_profile_contract():
    p = train.PROFILES["synthetic"]
    flops = [costs.image_gflops(a) for a in p.archs]
    assert len(flops) >= 3 and flops == sorted(flops) and flops[-1] / flops[0] >= 15
    steps = [b / a for a, b in zip(flops, flops[1:])]
    assert max(steps) / min(steps) < 1.5  # even FLOP steps
    assert p.world.test >= 5000
    assert train.level_digest(p, p.archs[0]) != train.level_digest(train.PROFILES["synthetic-tiny"], p.archs[0])


def test_batches_hold_whole_groups_of_near_duplicates():
    s = train.Schedule(batch_size=128, hard_groups=0.5)
    for step in (0, 7, 500):  # 500: a later epoch
        idx = train.batch_indices(30_000, 5, step, s)
        assert len(idx) == len(set(idx.tolist())) == 128
        sizes = np.bincount(np.bincount(idx // 5))
        assert sizes[5] == 13 and sizes[1] == 128 - 65 and sizes[2:5].sum() == 0  # 13 whole groups, the rest alone
        assert (idx == train.batch_indices(30_000, 5, step, s)).all()  # a resumed run sees the same batch
    plain = train.Schedule(batch_size=128)
    assert np.bincount(np.bincount(train.batch_indices(30_000, 5, 3, plain) // 5))[5:].sum() == 0
    assert train.level_digest(train.PROFILES["synthetic"], "bc-synth-s") != train.level_digest(
        dataclasses.replace(train.PROFILES["synthetic"], schedule=plain), "bc-synth-s")


def test_mlce_loss_is_the_mean_row_kl_of_self_similarities():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    mu = 0.1
    p = torch.softmax(txt @ txt.T / mu, 1)
    q = torch.softmax(img @ img.T / mu, 1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    got = objectives.mlce_loss(img, txt, mu)
    assert torch.allclose(got, want, atol=1e-5) and got > 0
    got.backward()
    assert img.grad is not None and img.grad.abs().sum() > 0  # it trains the image tower
    assert objectives.mlce_loss(txt, txt, mu).abs() < 1e-6  # zero when the neighbourhoods agree


def test_mlce_changes_the_checkpoint_key_only_when_on():
    base = train.PROFILES["synthetic"]
    off = dataclasses.replace(base, objective=objectives.Clip(mlce_mu=0.5))  # alpha 0: option off
    assert train.level_digest(off, base.archs[0]) == train.level_digest(base, base.archs[0])
    mlce = train.PROFILES["synthetic-mlce"]
    assert train.level_digest(mlce, base.archs[0]) != train.level_digest(base, base.archs[0])


def test_distillation_checkpoints_key_on_the_teacher_and_the_warm_start(tmp_path):
    weights = []
    for i in range(3):
        (tmp_path / f"{i}.pt").write_bytes(bytes([i]))
        weights.append(models.ModelSpec(f"m{i}", "bc-tiny-l", checkpoint=str(tmp_path / f"{i}.pt")))
    p = train.PROFILES["synthetic-tiny-distilled"]
    keys = {train.level_digest(p, p.archs[0], weights[0]), train.level_digest(p, p.archs[0], weights[1]),
            train.level_digest(p, p.archs[0], weights[0], init=weights[2]), train.level_digest(p, p.archs[0])}
    assert len(keys) == 4  # another teacher, a warm start or no teacher: another checkpoint
