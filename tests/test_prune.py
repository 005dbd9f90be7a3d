"""Self-pruning (SPDS): prefix heads equal the truncated models, the self-distillation loss, and a self-pruned ladder
trained, indexed and evaluated through the real parts with one text embedding per query."""
import os

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from bicascade import models, query, registry
from bicascade.errors import BadInputError
from bicascade.pipelines.lab import objectives, prune, train
from bicascade.pipelines.measure import evaluate

LADDER = "synthetic-tiny-spds"


def test_prefix_depths_are_checked_against_the_full_model():
    assert prune.depths(("bc-tiny-vit-d1", "bc-tiny-vit-d2")) == (1,)
    assert prune.depths(("bc-synth-vit-d2", "bc-synth-vit-d4", "bc-synth-vit-d6")) == (2, 4)
    with pytest.raises(BadInputError, match="fewer vision blocks"):
        prune.depths(("bc-tiny-s", "bc-tiny-vit-d2"))  # another width: not a prefix
    with pytest.raises(BadInputError, match="needs a ViT"):
        prune.depths(("bc-synth-s", "bc-synth-l"))
    with pytest.raises(BadInputError, match="must rise"):
        prune.depths(("bc-synth-vit-d4", "bc-synth-vit-d2", "bc-synth-vit-d6"))


def test_a_self_pruned_model_keys_on_its_prefixes_and_its_start(tmp_path):
    (tmp_path / "vit.pt").write_bytes(b"weights")
    start = models.ModelSpec("vit", "bc-synth-vit-d6", checkpoint=str(tmp_path / "vit.pt"))
    top = "bc-synth-vit-d6"
    keys = {train.level_digest(train.PROFILES["synthetic-vit"], top),
            train.level_digest(train.PROFILES["synthetic-spds-scratch"], top),
            train.level_digest(train.PROFILES["synthetic-spds"], top, init=start)}
    assert len(keys) == 3  # trained without prefixes, with them, or with them from other weights: three checkpoints


def test_prefix_heads_equal_the_models_cut_from_the_full_one(tmp_path):
    torch.manual_seed(0)
    full = open_clip.create_model("bc-tiny-vit-d2", pretrained=None).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, last = prune.heads(full.visual, x, (1,))
        assert torch.allclose(last, full.encode_image(x), atol=1e-5)
    ckpt = models.save_checkpoint(full, tmp_path / "full.pt")
    cut = prune.derive(ckpt, 1, tmp_path / "d1.pt")
    assert not any(k.startswith("visual.transformer.resblocks.1.") for k in models.read_state_dict(cut))
    loaded = models.load_model(models.ModelSpec("d1", "bc-tiny-vit-d1", checkpoint=str(cut)), device="cpu")
    assert np.allclose(loaded.encode_pixels(x), F.normalize(first, dim=-1).numpy(), atol=1e-5)
    with pytest.raises(BadInputError, match="VisionTransformer"):
        prune.heads(open_clip.create_model("bc-synth-s", pretrained=None).visual, torch.randn(1, 3, 64, 64), (1,))


def test_self_distillation_vanishes_at_the_full_model_and_trains_only_the_prefix():
    torch.manual_seed(0)
    final, txt = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_(), F.normalize(torch.randn(8, 16), dim=-1)
    assert objectives.self_distillation_loss(final, final, txt, torch.tensor(20.0)).abs() < 1e-5
    prefix = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    loss = objectives.self_distillation_loss(prefix, final, txt, torch.tensor(20.0))
    assert loss > 0.1
    loss.backward()
    assert prefix.grad.abs().sum() > 0 and final.grad is None  # the full model is the target, not a student


@pytest.fixture(scope="module")
def pruned(indexed_ladder):
    """The tiny self-pruned ladder, trained once, with the world's test split indexed by its prefix level."""
    with indexed_ladder(LADDER) as got:
        yield got


@pytest.fixture(autouse=True)
def isolated_cache():  # this module's tests share the pruned fixture's cache
    yield


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_self_pruned_ladder_is_cut_from_one_model_and_evaluates_with_one_text_embedding(pruned, monkeypatch):
    ladder, root, db = pruned
    assert ladder.levels == (f"{LADDER}-d1", f"{LADDER}-d2") and ladder.shared_text_tower
    assert models.text_encoders(ladder.levels) == [0, 0]
    prefix, full = (models.read_state_dict(registry.get_model(n).checkpoint) for n in ladder.levels)
    assert all(torch.equal(v, full[k]) for k, v in prefix.items()) and len(prefix) < len(full)
    report = evaluate.evaluate(evaluate.world_heldout(root), query.registered(ladder.name), cutoffs=(50,), db=db,
                               device="cpu")
    assert report.text["encodes_per_query"] == 1
    assert report.levels[0].gflops < report.levels[1].gflops
    assert all(lv.recall["10"] > 0.1 for lv in report.levels)  # chance is 10 / 300
    # a lost prefix is cut again from the trained model, without training
    os.unlink(registry.get_model(ladder.levels[0]).checkpoint)
    monkeypatch.setattr(train, "train_level", lambda *a, **k: pytest.fail("the full model is already trained"))
    again = train.ensure_ladder(LADDER, with_world=False)[0]
    assert again == ladder
    assert models.read_state_dict(registry.get_model(ladder.levels[0]).checkpoint).keys() == prefix.keys()
