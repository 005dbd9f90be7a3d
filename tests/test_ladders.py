"""Ladders from the command line: LEVEL strings, YAML files, validation on add, show/list/remove, offline hub tags."""
import json
from pathlib import Path

import pytest
import torch

from bicascade import ladders, models, registry
from bicascade.errors import BadInputError, MissingWeightsError, UnknownNameError

from conftest import cli, cli_json


@pytest.fixture
def checkpoints(tmp_path):
    """Random-init checkpoints of two tiny architectures of rising cost, the second with the first's text tower
    (as a distilled pair would have), and a third with a text tower of its own."""
    torch.manual_seed(0)
    small = models.create("bc-tiny-s")
    large = models.create("bc-tiny-l")
    large.load_state_dict({k: v for k, v in small.state_dict().items() if not k.startswith("visual.")}, strict=False)
    other = models.create("bc-tiny-l")
    return {name: models.save_checkpoint(m, tmp_path / f"{name}.pt")
            for name, m in (("small", small), ("large", large), ("other", other))}


def test_level_strings():
    assert ladders.parse_level("ViT-B-16@laion2b_s34b_b88k", "x", 0) == models.ModelSpec(
        "x/ViT-B-16", "ViT-B-16", pretrained="laion2b_s34b_b88k")
    spec = ladders.parse_level("bc-tiny-s=rel/ckpt.pt", "x", 0)
    assert spec.arch == "bc-tiny-s" and spec.checkpoint.endswith("/rel/ckpt.pt") and spec.checkpoint.startswith("/")
    assert ladders.parse_level("hf-hub:org/repo", "x", 1).arch == "hf-hub:org/repo"
    assert ladders.parse_level("bc-tiny-s", "x", 3).seed == 3  # random weights, reproducible
    with pytest.raises(UnknownNameError, match="no architecture 'ViT-Q-32'"):
        ladders.parse_level("ViT-Q-32=/x.pt", "x", 0)
    with pytest.raises(UnknownNameError, match="no pretrained tag 'nope' for ViT-B-16.*laion2b_s34b_b88k"):
        ladders.parse_level("ViT-B-16@nope", "x", 0)
    cheap = ladders.parse_level("ViT-B-16=/x.pt#keep=0.25", "x", 0)  # a cheaper level of the same weights
    assert (cheap.name, cheap.keep_patches, cheap.checkpoint) == ("x/ViT-B-16-p25", 0.25, "/x.pt")
    for keep in ("1.5", "0", "half"):
        with pytest.raises(BadInputError, match="keep must be a fraction of the patch tokens in \\(0, 1\\)"):
            ladders.parse_level(f"ViT-B-16=/x.pt#keep={keep}", "x", 0)


def test_add_validates_saves_and_compares_text_towers(checkpoints):
    shared = ladders.add("pair", [ladders.parse_level(f"bc-tiny-s={checkpoints['small']}", "pair", 0),
                                  ladders.parse_level(f"bc-tiny-l={checkpoints['large']}", "pair", 1)])
    assert shared.shared_text_tower and [lv.arch for lv in shared.levels] == ["bc-tiny-s", "bc-tiny-l"]
    assert shared.levels[0].gflops < shared.levels[1].gflops and shared.levels[0].dim == 32
    assert len({lv.fingerprint for lv in shared.levels}) == 2
    registry._LADDERS.pop("pair")  # another process sees it from the file
    assert registry.get_ladder("pair").levels == ("pair/bc-tiny-s", "pair/bc-tiny-l")
    assert models.text_encoders(registry.get_ladder("pair").levels) == [0, 0]
    apart = ladders.add("apart", [ladders.parse_level(f"bc-tiny-s={checkpoints['small']}", "apart", 0),
                                  ladders.parse_level(f"bc-tiny-l={checkpoints['other']}", "apart", 1)])
    assert not apart.shared_text_tower
    with pytest.raises(BadInputError, match="exists"):
        ladders.add("pair", [ladders.parse_level("bc-tiny-s", "pair", 0)])
    with pytest.raises(BadInputError, match="rise in image cost, cheapest first"):
        ladders.add("down", [ladders.parse_level(f"bc-tiny-l={checkpoints['large']}", "down", 0),
                             ladders.parse_level(f"bc-tiny-s={checkpoints['small']}", "down", 1)])
    with pytest.raises(MissingWeightsError, match="does not fit 'bc-tiny-s'"):
        ladders.add("misfit", [ladders.parse_level(f"bc-tiny-s={checkpoints['large']}", "misfit", 0)])
    with pytest.raises(MissingWeightsError, match="checkpoint not found"):
        ladders.add("gone", [ladders.parse_level("bc-tiny-s=/nowhere/x.pt", "gone", 0)])
    with pytest.raises(BadInputError, match="built-in"):
        registry.remove_ladder("openclip-vit")


def test_a_level_on_a_fixed_share_of_a_users_vit_patches_is_cheaper_and_shares_the_text_tower(tmp_path):
    """#keep=F (or `keep_patches` in YAML) makes a cheap level of a ViT checkpoint without training; an image tower
    without patch tokens is refused when the ladder is added."""
    vit = models.save_checkpoint(models.create("bc-tiny-vit-d2"), tmp_path / "vit.pt")
    doc = ladders.add("free", [ladders.parse_level(f"bc-tiny-vit-d2={vit}#keep=0.5", "free", 0),
                               ladders.parse_level(f"bc-tiny-vit-d2={vit}", "free", 1)])
    assert [lv.model for lv in doc.levels] == ["free/bc-tiny-vit-d2-p50", "free/bc-tiny-vit-d2"]
    assert doc.shared_text_tower and doc.levels[0].gflops < 0.75 * doc.levels[1].gflops
    assert doc.levels[0].fingerprint != doc.levels[1].fingerprint
    (tmp_path / "l.yaml").write_text("levels:\n  - arch: bc-tiny-vit-d2\n    checkpoint: vit.pt\n"
                                     "    keep_patches: 0.25\n")
    assert ladders.from_yaml(tmp_path / "l.yaml", "y")[1][0].keep_patches == 0.25
    resnet = models.save_checkpoint(models.create("bc-synth-s"), tmp_path / "rn.pt")
    with pytest.raises(BadInputError, match="keep_patches needs a ViT"):
        ladders.add("conv", [ladders.parse_level(f"bc-synth-s={resnet}#keep=0.5", "conv", 0)])


def test_yaml_ladders_resolve_paths_against_the_file(checkpoints, tmp_path):
    (tmp_path / "ladder.yaml").write_text(
        "name: from-file\ndescription: two tiny levels\nlevels:\n"
        f"  - bc-tiny-s={checkpoints['small'].name}\n"
        f"  - arch: bc-tiny-l\n    checkpoint: {checkpoints['large'].name}\n    name: big\n")
    name, specs, about = ladders.from_yaml(tmp_path / "ladder.yaml")
    assert (name, about) == ("from-file", "two tiny levels")
    assert [s.name for s in specs] == ["from-file/bc-tiny-s", "big"]
    assert all(s.checkpoint == str(checkpoints[k]) for s, k in zip(specs, ("small", "large")))
    (tmp_path / "bad.yaml").write_text("levels:\n  - arch: bc-tiny-s\n    checkpoint: a.pt\n    pretrained: b\n")
    with pytest.raises(BadInputError, match="one of checkpoint, pretrained, hf_hub"):
        ladders.from_yaml(tmp_path / "bad.yaml", "bad")
    (tmp_path / "typo.yaml").write_text("name: t\nlevel: []\n")
    with pytest.raises(BadInputError, match="non-empty `levels`"):
        ladders.from_yaml(tmp_path / "typo.yaml")


def test_the_commands(checkpoints, tmp_path):
    doc = cli_json("ladders", "add", "mine", f"bc-tiny-s={checkpoints['small']}", f"bc-tiny-l={checkpoints['other']}")
    assert set(doc) >= {"name", "levels", "shared_text_tower"} and doc["name"] == "mine"
    assert set(doc["levels"][0]) >= {"model", "arch", "gflops", "dim", "fingerprint"}
    assert cli_json("ladders", "show", "mine") == doc
    listed = {row["name"]: row for row in cli_json("ladders")["ladders"]}
    assert listed["mine"]["kind"] == "user" and listed["mine"]["ready"]
    assert listed["openclip-vit"]["kind"] == "built-in"
    tiny = listed["synthetic-tiny"]  # a ladder the project can make: not trained in this cache yet
    assert tiny["kind"] == "trainable" and not tiny["ready"]
    assert tiny["make"] == "bicascade train --ladder synthetic-tiny"
    (tmp_path / "l.yaml").write_text(f"levels: [bc-tiny-s={checkpoints['small']}]\n")
    assert cli_json("ladders", "add", "--from", str(tmp_path / "l.yaml"), "yamled")["name"] == "yamled"
    r = cli("ladders", "add", "rand", "bc-tiny-s", "bc-tiny-l", "--json")
    assert "random weights" in r.stderr and json.loads(r.stdout)["levels"][0]["weights"] == "random (seed 0)"
    assert cli("ladders", "remove", "mine").returncode == 0
    r = cli("ladders", "show", "mine", check=False)
    assert r.returncode == 2 and "unknown ladder 'mine'" in r.stderr


def test_an_offline_hub_tag_fails_in_one_line(monkeypatch):
    """Without the hub (as on this machine) a pretrained tag is one clear line at once, not retries and a trace."""
    if models.hub_reachable():
        pytest.skip("this machine reaches the model hub")
    r = cli("ladders", "add", "hub", "ViT-B-16@laion2b_s34b_b88k", "ViT-L-14@laion2b_s32b_b82k", check=False,
            timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model hub is unreachable" in lines[0] and "ViT-B-16=PATH" in lines[0], r.stderr


def _npz_kind(monkeypatch):
    """Weights from a NumPy .npz file: a level kind defined here, in one place (this test's kinds leave with it)."""
    import hashlib

    import numpy as np

    from bicascade import kinds

    monkeypatch.setattr(kinds, "_KINDS", kinds.known())

    def parse(text, j):
        if not text.startswith("npz:"):
            return None
        arch, file = text.removeprefix("npz:").split("=", 1)
        return {"arch": models.check_arch(arch, text), "kind": "npz", "source": str(Path(file).resolve())}

    def build(spec):
        m = models.create(spec.arch)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(spec.source).items()})
        return m

    def weights(spec):
        return "npz:" + hashlib.sha256(Path(spec.source).read_bytes()).hexdigest()

    return kinds.register(kinds.Kind("npz", "npz:ARCH=PATH", parse=parse, build=build, weights=weights), first=True)


def _save_npz(model, path):
    import numpy as np

    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})
    return path


def test_a_new_level_kind_is_one_registration(tmp_path, monkeypatch):
    """Its syntax, build, fingerprint and label defined in one place, and the kind then works everywhere a level goes
    (parse, load, describe, fingerprints)."""
    import numpy as np

    from bicascade import kinds

    npz = _npz_kind(monkeypatch)
    torch.manual_seed(0)
    model = models.create("bc-tiny-s")
    path = _save_npz(model, tmp_path / "weights.npz")
    spec = ladders.parse_level(f"npz:bc-tiny-s={path}", "x", 0)
    assert (spec.name, spec.kind, spec.source) == ("x/bc-tiny-s", "npz", str(path)) and kinds.of(spec) is npz
    loaded = models.load_model(spec, device="cpu")
    texts = ["a red circle", "two blue squares"]
    ckpt = models.save_checkpoint(model, tmp_path / "same.pt")  # the same weights, loaded the built-in way
    reference = models.load_model(ladders.parse_level(f"bc-tiny-s={ckpt}", "x", 0), device="cpu")
    assert np.allclose(loaded.encode_texts(texts), reference.encode_texts(texts), atol=1e-6)
    doc = ladders.describe("x", [spec], False)
    assert doc.levels[0].weights.startswith("npz:") and doc.levels[0].fingerprint == loaded.fingerprint
    assert loaded.fingerprint != reference.fingerprint  # another kind of weights is another table
    np.savez(path, **{k: (v * 0.5).numpy() for k, v in model.state_dict().items()})
    assert models.load_model(spec, device="cpu").fingerprint != loaded.fingerprint  # new bytes, new fingerprint
    monkeypatch.setattr(kinds, "_KINDS", [k for k in kinds.known() if k.name != "npz"])
    with pytest.raises(UnknownNameError, match="no level kind 'npz' is registered"):
        models.load_model(spec, device="cpu")


def test_keep_patches_is_a_kind_that_changes_a_level_of_any_kind(tmp_path, monkeypatch):
    """LEVEL#keep=F owns its syntax, build, fingerprint, cost and label in bicascade/patches.py, over whatever kind
    the level is: here a kind registered after it, and asked for first."""
    from bicascade import costs, kinds, patches

    _npz_kind(monkeypatch)
    path = _save_npz(models.create("bc-tiny-vit-d2"), tmp_path / "vit.npz")
    spec = ladders.parse_level(f"npz:bc-tiny-vit-d2={path}#keep=0.25", "x", 0)
    full = ladders.parse_level(f"npz:bc-tiny-vit-d2={path}", "x", 1)
    assert kinds.of(spec) is patches.KIND and kinds.of(patches.base(spec)) is kinds.of(full)
    assert (spec.name, spec.kind, spec.keep_patches) == ("x/bc-tiny-vit-d2-p25", "npz", 0.25)
    model = models.build_model(spec)
    assert isinstance(model.visual.patch_dropout, patches.FixedPatches)
    kept = model.visual.patch_dropout.index
    assert kept[0] == 0 and len(kept) == 1 + round(0.25 * model.visual.grid_size[0] * model.visual.grid_size[1])
    cheap, dear = costs.image_gflops(spec), costs.image_gflops(full)
    assert 0.15 * dear < cheap < 0.5 * dear  # a quarter of the tokens, plus what does not scale with them
    doc = ladders.describe("x", [spec, full], True)
    assert doc.levels[0].weights == doc.levels[1].weights + " on 25% of its patches"
    assert doc.levels[0].fingerprint != doc.levels[1].fingerprint
    assert models.text_identity(spec) == models.text_identity(full)  # the same text tower: one query embedding
    with pytest.raises(BadInputError, match=r"keep must be a fraction .* got '1.5'"):
        ladders.parse_level(f"npz:bc-tiny-vit-d2={path}#keep=1.5", "x", 0)
