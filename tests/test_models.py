"""Registries, loading from local checkpoints saved from random init, fingerprints, devices."""
import numpy as np
import pytest
import torch
from PIL import Image

from bicascade import models, registry
from bicascade.errors import MissingWeightsError, UnknownNameError


def test_builtin_ladders_registered():
    ladders = {ladder.name: ladder for ladder in registry.list_ladders()}
    assert ladders["openclip-vit"].levels == ("ViT-B-16", "ViT-L-14", "ViT-g-14")
    assert ladders["openclip-convnext"].levels == ("convnext_base_w", "convnext_large_d", "convnext_xxlarge")
    assert registry.get_model("ViT-g-14").pretrained == "laion2b_s34b_b88k"


def test_unknown_names_list_known_ones():
    with pytest.raises(UnknownNameError, match="openclip-vit"):
        registry.get_ladder("nope")
    with pytest.raises(UnknownNameError, match="ViT-B-16"):
        registry.get_model("not-a-model")


def test_cpu_precision_is_fp32():
    dev, dtype = models.pick_device("cpu")
    assert dev.type == "cpu" and dtype == torch.float32


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(1)
    loaded = models.load_model("bc-test-vit", device="cpu", seed=1)
    return models.save_checkpoint(loaded.model, tmp_path / "tiny.pt"), loaded


def test_local_checkpoint_roundtrip(checkpoint):
    path, original = checkpoint
    spec = models.ModelSpec("tiny", "bc-test-vit", checkpoint=str(path))
    loaded = models.load_model(spec, device="cpu")
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    a, b = original.encode_images(images), loaded.encode_images(images)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (2, 32) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    t = loaded.encode_texts(["a red square", "a blue circle"])
    assert t.shape == (2, 32)
    assert loaded.fingerprint != original.fingerprint  # file weights vs random:1


def test_fingerprint_tracks_weights(tmp_path, checkpoint):
    path, loaded = checkpoint
    spec = models.ModelSpec("tiny", "bc-test-vit", checkpoint=str(path))
    fp1 = models.load_model(spec, device="cpu").fingerprint
    with torch.no_grad():
        loaded.model.logit_scale.add_(1.0)
    models.save_checkpoint(loaded.model, tmp_path / "tiny2.pt")
    fp2 = models.load_model(models.ModelSpec("tiny", "bc-test-vit", checkpoint=str(tmp_path / "tiny2.pt")),
                            device="cpu").fingerprint
    assert fp1 != fp2
    assert models.load_model(spec, device="cpu").fingerprint == fp1


class Payload:
    """An object whose unpickling would run code: weights_only=True must refuse the file before that."""

    ran = False

    def __reduce__(self):
        return (setattr, (Payload, "ran", True))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="checkpoint not found"):
        models.read_state_dict(tmp_path / "missing.pt")
    bad = tmp_path / "pickled.pt"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(MissingWeightsError, match="cannot be read safely"):
        models.read_state_dict(bad)
    assert not Payload.ran
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo": torch.zeros(1)}, wrong)
    with pytest.raises(MissingWeightsError, match="does not fit"):
        models.load_model(models.ModelSpec("w", "bc-test-vit", checkpoint=str(wrong)), device="cpu")
    other = models.save_checkpoint(models.create("bc-tiny-s"), tmp_path / "other-arch.pt")
    with pytest.raises(MissingWeightsError, match="does not fit"):
        models.load_model(models.ModelSpec("w", "bc-test-vit", checkpoint=str(other)), device="cpu")


def test_open_clip_training_checkpoints_load(tmp_path, checkpoint):
    path, original = checkpoint
    wrapped = tmp_path / "epoch_3.pt"  # what open_clip's trainer writes: a dict with a DDP-prefixed state_dict
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in
                                                           models.read_state_dict(path).items()}}, wrapped)
    loaded = models.load_model(models.ModelSpec("t", "bc-test-vit", checkpoint=str(wrapped)), device="cpu")
    im = [Image.new("RGB", (32, 32), "green")]
    np.testing.assert_allclose(loaded.encode_images(im), original.encode_images(im), atol=1e-6)


def test_loading_a_checkpoint_does_not_claim_random_weights(checkpoint, caplog):
    path, _ = checkpoint
    with caplog.at_level("WARNING"):
        models.load_model(models.ModelSpec("t", "bc-test-vit", checkpoint=str(path)), device="cpu")
    assert "initialized randomly" not in caplog.text and "No pretrained weights" not in caplog.text


def test_pretrained_without_hub_fails_clearly(monkeypatch):
    import open_clip

    def offline(*a, pretrained=None, **k):
        if pretrained:
            raise RuntimeError("hub unreachable")
        return orig(*a, **k)
    orig = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(MissingWeightsError, match="bc-test-vit=PATH"):
        models.load_model(models.ModelSpec("t", "bc-test-vit", pretrained="some_tag"), device="cpu")


def test_saved_ladder_is_listed(checkpoint):
    path, _ = checkpoint
    spec = models.ModelSpec("tiny-a", "bc-test-vit", checkpoint=str(path))
    registry.save_ladder(registry.Ladder("derived", ("tiny-a",), shared_text_tower=True), [spec])
    registry._LADDERS.pop("derived")  # a fresh process would only see the file
    assert registry.get_ladder("derived").shared_text_tower
