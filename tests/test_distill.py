"""Two-stage distillation: the losses, a distilled ladder that shares its teacher's text tower, and every consumer
(eval, in-process search, the served cascade over HTTP) computing one text embedding per query for it."""
import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F

from bicascade import models, query
from bicascade.errors import BadInputError
from bicascade.pipelines.lab import objectives, train, world
from bicascade.pipelines.lab.objectives import Teacher
from bicascade.pipelines.measure import evaluate

from conftest import cli_json, serving

LADDER = "synthetic-tiny-distilled"


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_feature_loss_is_the_cosine_distance_to_the_teacher():
    torch.manual_seed(0)
    t = unit(8, 16)
    assert objectives.feature_loss(t, t).abs() < 1e-6
    assert torch.isclose(objectives.feature_loss(-t, t), torch.tensor(2.0))
    assert objectives.feature_loss(unit(8, 16), t) > 0.5


def test_aligned_kd_loss_trains_only_the_student_and_its_kd_term_vanishes_at_the_teacher():
    torch.manual_seed(0)
    t_img, t_txt = unit(8, 16), unit(8, 16)
    s_img = t_img.clone().requires_grad_()
    at_teacher = objectives.aligned_kd_loss(s_img, t_img, t_txt, scale=20.0, kd_weight=1.0)
    plain = objectives.aligned_kd_loss(s_img, t_img, t_txt, scale=20.0, kd_weight=0.0)
    assert torch.isclose(at_teacher, plain)  # the student matches the teacher: nothing to distil
    other = unit(8, 16).requires_grad_()
    with_kd, plain = (objectives.aligned_kd_loss(other, t_img, t_txt, 20.0, w) for w in (1.0, 0.0))
    assert with_kd > plain
    objectives.aligned_kd_loss(other, t_img, t_txt, 20.0).backward()
    assert other.grad is not None and other.grad.abs().sum() > 0


def test_a_student_adopts_the_teacher_text_tower_frozen():
    import open_clip

    torch.manual_seed(0)
    teacher = open_clip.create_model("bc-tiny-l", pretrained=None)
    tower = {k: v for k, v in teacher.state_dict().items() if not k.startswith("visual.")}
    student = open_clip.create_model("bc-tiny-s", pretrained=None)
    Teacher(torch.zeros(1, 32), torch.zeros(1, 1, 32), tower, 10.0).adopt(student)
    for name, p in student.named_parameters():
        assert p.requires_grad == name.startswith("visual.")
        if name in tower:
            assert torch.equal(p, tower[name])
    fresh = open_clip.create_model("bc-tiny-s", pretrained=None)
    partial = {k: v for k, v in tower.items() if k != "text_projection"}  # a tower that lacks part of the text side
    with pytest.raises(BadInputError, match="text tower differs.*text_projection"):
        Teacher(torch.zeros(1, 32), torch.zeros(1, 1, 32), partial, 10.0).adopt(fresh)
    wider = {**tower, "text_projection": torch.zeros(64, 48)}  # another text tower's shapes: the same clear error
    with pytest.raises(BadInputError, match="text tower differs.*text_projection"):
        Teacher(torch.zeros(1, 32), torch.zeros(1, 1, 32), wider, 10.0).adopt(fresh)


def test_a_warm_started_student_keeps_its_own_image_tower_and_the_teacher_text_tower(tmp_path):
    import open_clip

    torch.manual_seed(0)
    teacher = open_clip.create_model("bc-tiny-l", pretrained=None)
    tower = {k: v for k, v in teacher.state_dict().items() if not k.startswith("visual.")}
    start = models.save_checkpoint(open_clip.create_model("bc-tiny-s", pretrained=None), tmp_path / "s.pt")
    data = objectives.TrainData(np.zeros((4, 32, 32, 3), np.uint8), [["a"]] * 4)
    teacher = models.ModelSpec("t", "bc-tiny-l", checkpoint=str(models.save_checkpoint(teacher, tmp_path / "t.pt")))
    data._teachers["t"] = Teacher(torch.zeros(4, 32), torch.zeros(4, 1, 32), tower, 10.0)
    out = train.train_level("bc-tiny-s", data, train.Schedule(samples=0), objectives.Distill(), tmp_path / "student.pt",
                            objectives.Context(teacher=teacher, device="cpu"),
                            init=models.ModelSpec("s", "bc-tiny-s", checkpoint=str(start)))
    got, init = models.read_state_dict(out), models.read_state_dict(start)
    assert all(torch.equal(got[k], init[k]) for k in init if k.startswith("visual."))
    assert all(torch.equal(got[k], tower[k]) for k in tower)


@pytest.fixture(scope="module")
def distilled(indexed_ladder):
    """The tiny teacher, its two distilled students, and the world's test split indexed with the student level 0."""
    with indexed_ladder(LADDER) as got:
        yield got


@pytest.fixture(autouse=True)
def isolated_cache():  # this module's tests share the distilled fixture's cache
    yield


@pytest.mark.slow
def test_distilled_ladder_shares_the_teacher_text_tower_and_follows_its_image_space(distilled, monkeypatch):
    ladder, root, _ = distilled
    teacher = train.ensure_ladder("synthetic-tiny", with_world=False)[0]
    assert ladder.levels == (f"{LADDER}-s", f"{LADDER}-m", teacher.levels[-1]) and ladder.shared_text_tower
    assert models.text_encoders(ladder.levels) == [0, 0, 0]
    assert models.text_encoders(teacher.levels) == [0, 1, 2]  # independently trained: three text towers
    # the students land in the teacher's image space; the independently trained level of the same arch does not
    paths, _ = world.load_split(root, "test")
    top = evaluate.embed_images(models.load_model(teacher.levels[-1], device="cpu"), paths[:200])
    student = evaluate.embed_images(models.load_model(ladder.levels[0], device="cpu"), paths[:200])
    independent = evaluate.embed_images(models.load_model(teacher.levels[0], device="cpu"), paths[:200])
    assert (student * top).sum(1).mean() > 0.5 > (independent * top).sum(1).mean()
    monkeypatch.setattr(train, "train_level", lambda *a, **k: pytest.fail("a second run must reuse the students"))
    assert train.ensure_ladder(LADDER, with_world=False)[0] == ladder


@pytest.mark.slow
def test_eval_embeds_each_query_once_for_a_shared_text_tower(distilled):
    ladder, root, db = distilled
    report = evaluate.evaluate(evaluate.world_heldout(root), query.registered(ladder.name), cutoffs=(50, 14), db=db,
                               device="cpu")
    text = report.text
    assert text["encodes_per_query"] == 1 and text["levels"] == 3
    assert np.isclose(text["gflops_per_query_unshared"], 3 * text["gflops_per_query"])
    assert all(lv.recall["10"] > 0.1 for lv in report.levels)  # chance is 10 / 300
    assert "1 embedding(s) per query" in report.format()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_search_and_the_served_cascade_compute_one_text_embedding(distilled):
    _, _, db = distilled
    body = {"query": "three large blue squares", "k": 5}
    local = cli_json("search", body["query"], "--db", db, "--k", "5")
    assert local["stats"]["text_encodes"] == 1
    with serving(db) as server:
        served = requests.post(f"{server.url}/search", json=body, timeout=120).json()
        assert served["stats"]["text_encodes"] == 1
        assert [x["id"] for x in served["results"]] == [x["id"] for x in local["results"]]
        shallow = requests.post(f"{server.url}/search", json={**body, "levels": 2}, timeout=120).json()
        assert shallow["stats"]["text_encodes"] == 1 and len(shallow["stats"]["levels"]) == 2
