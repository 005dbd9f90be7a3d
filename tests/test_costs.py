"""FLOPs counted on the real architectures (no weights), Eq. 1 / Eq. 2, measured seconds."""
import pytest

from bicascade import costs
from bicascade.cascade import f_latency, f_life
from bicascade.errors import BadInputError

# Image-encoder GFLOPs per image (2 x MACs) of the paper's ladders, computed by hand from the
# architectures: e.g. ViT-B-16 = 12 layers x (4*768^2*197 + 2*768*3072*197 + 2*197^2*768) + patch embed.
EXPECTED = {"ViT-B-16": 35.1, "ViT-L-14": 162.0, "ViT-g-14": 534.1,
            "convnext_base_w": 40.1, "convnext_large_d": 89.8, "convnext_xxlarge": 395.9}


@pytest.mark.parametrize("name", EXPECTED)
def test_image_gflops_match_architecture(name):
    assert costs.image_gflops(name) == pytest.approx(EXPECTED[name], rel=0.005)


def test_eq1_eq2():
    c = [35.13, 162.03, 534.06]
    assert f_life([c[0], c[2]], 0.1) == pytest.approx(534.06 / (35.13 + 53.406))
    assert f_life(c, 0.1) == pytest.approx(534.06 / (35.13 + 0.1 * (162.03 + 534.06)))
    assert f_latency(c, [50, 14]) == pytest.approx(50 * 534.06 / (162.03 * 50 + 534.06 * 14))
    assert f_latency(c[:2], [50]) is None
    with pytest.raises(BadInputError, match="p must lie"):
        f_life(c, 1.5)
    with pytest.raises(BadInputError, match="needs 2 cutoffs"):
        f_latency(c, [50])


def test_report_shape_and_single_level_reference():
    doc = costs.cascade_report([["ViT-B-16"], ["ViT-L-14"], ["ViT-B-16", "ViT-g-14"],
                                ["ViT-B-16", "ViT-L-14", "ViT-g-14"]]).to_json()
    rows = doc["cascades"]
    assert doc["reference"] == "ViT-g-14"
    assert rows[0]["f_life"] == pytest.approx(534.06 / 35.13, rel=0.01)  # vs the costliest name in the call
    assert rows[0]["f_latency"] is None and rows[2]["f_latency"] is None
    assert rows[2]["f_life"] == pytest.approx(6.03, abs=0.02)
    assert rows[3]["f_life"] == pytest.approx(5.10, abs=0.02)
    assert rows[3]["f_latency"] == pytest.approx(1.714, abs=0.005)
    assert [len(r["gflops"]) for r in rows] == [1, 1, 2, 3]


def test_measure_times_the_encoder():
    doc = costs.cascade_report([["bc-test-vit"], ["bc-test-vit", "bc-test-vit"]], measure=True, batch_size=2).to_json()
    row = doc["cascades"][1]
    assert all(s > 0 for s in row["seconds_per_image"])
    assert row["f_life_measured"] > 0 and doc["measure"]["batch_size"] == 2
