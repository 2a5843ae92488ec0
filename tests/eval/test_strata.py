"""Skin-tone strata and bootstrap intervals: ITA of constructed faces, the six bins, and strata that add up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from colorize_dist.eval import intervals, strata
from colorize_dist.eval.card import summarise

BACKGROUND = (50.0, 0.0, -30.0)  # blue: outside the skin box's hues
SKIN_A, SKIN_B = 12.0, 20.0  # hue 59°, chroma 23: inside the box at every L used below


def face(ita_degrees: float, skin_rows: int = 12, lip_rows: int = 2, side: int = 20) -> torch.Tensor:
    """(3, side, side) CIELAB: a skin patch of the given ITA over the top `skin_rows` rows, then `lip_rows` rows of
    lip colour (skin by the mask, another ITA: the ITA must come from medians), then background."""
    lab = torch.tensor(BACKGROUND, dtype=torch.float64)[:, None, None].repeat(1, side, side)
    skin = [50.0 + SKIN_B * math.tan(math.radians(ita_degrees)), SKIN_A, SKIN_B]
    lab[:, :skin_rows] = torch.tensor(skin, dtype=torch.float64)[:, None, None]
    lab[:, skin_rows:skin_rows + lip_rows] = torch.tensor([40.0, 30.0, 15.0], dtype=torch.float64)[:, None, None]
    return lab


@pytest.mark.parametrize(("ita", "stratum"), [(60.0, "very light"), (48.0, "light"), (35.0, "intermediate"),
                                              (20.0, "tan"), (0.0, "brown"), (-45.0, "dark"), (-60.0, "dark")])
def test_constructed_faces_get_their_ita_and_bin(ita: float, stratum: str):
    angle = strata.individual_typology_angle(face(ita)[None])
    assert angle.item() == pytest.approx(ita, abs=1e-9)
    assert strata.STRATA[strata.stratum_of(angle.numpy())[0]] == stratum


def test_images_without_enough_skin_get_no_ita():
    images = torch.stack([face(30.0, skin_rows=0, lip_rows=0, side=40), face(30.0, skin_rows=1, lip_rows=0, side=40)])
    assert strata.skin_mask(images).sum(dim=(1, 2)).tolist() == [0, 40]  # 0 and 2.5 % of the pixels: below 5 %
    angles = strata.individual_typology_angle(images)
    assert torch.isnan(angles).all()
    assert [strata.STRATA[i] for i in strata.stratum_of(angles.numpy())] == [strata.NO_SKIN, strata.NO_SKIN]


def test_bin_edges_follow_the_standard_categories():
    """Lower bounds excluded, upper included: > 55 very light, 41–55 light, …, ≤ −30 dark."""
    angles = np.array([55.0001, 55.0, 41.0001, 41.0, 28.0001, 28.0, 10.0, -29.9999, -30.0, -90.0, math.nan])
    expected = ["very light", "light", "light", "intermediate", "intermediate", "tan", "brown", "brown", "dark",
                "dark", strata.NO_SKIN]
    assert [strata.STRATA[i] for i in strata.stratum_of(angles)] == expected


def test_bootstrap_interval_is_seeded_and_has_the_normal_width():
    values = np.random.default_rng(0).normal(10.0, 2.0, size=(400, 1))
    first, second = intervals.bootstrap_means(values, stream=0), intervals.bootstrap_means(values, stream=0)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, intervals.bootstrap_means(values, stream=1))
    low, high = intervals.percentile_interval(first)
    assert low[0] < values.mean() < high[0]
    normal_width = 2 * 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert (high[0] - low[0]) == pytest.approx(normal_width, rel=0.15)


def test_strata_add_up_to_the_overall_figures_and_name_the_largest_gap():
    rng = np.random.default_rng(1)
    ita = np.concatenate([rng.uniform(56, 70, 60), rng.uniform(11, 27, 50), rng.uniform(-60, -31, 3),
                          np.full(7, math.nan)])
    psnr = np.where(ita > 55, 30.0, 27.0) + rng.normal(0, 0.5, len(ita))  # very light 3 dB above tan
    psnr[(ita < -30)] = 10.0  # 3 dark images, far below: too few (< 20) to take part in the gap
    per_image = {"psnr_lab": psnr, "delta_e": rng.uniform(5, 15, len(ita))}

    summary = summarise(per_image, ita, min_stratum_images=20)
    by_name = {entry["stratum"]: entry for entry in summary["strata"]}
    assert [entry["stratum"] for entry in summary["strata"]] == list(strata.STRATA)
    assert {name: entry["images"] for name, entry in by_name.items()} == {
        "very light": 60, "light": 0, "intermediate": 0, "tan": 50, "brown": 0, "dark": 3, strata.NO_SKIN: 7}
    assert sum(entry["images"] for entry in summary["strata"]) == summary["images"] == len(ita)
    for metric in per_image:
        weighted = sum(entry["images"] * entry["metrics"][metric]["mean"] for entry in summary["strata"]
                       if entry["images"])
        assert weighted / len(ita) == pytest.approx(summary["metrics"][metric]["mean"], rel=1e-12)
        assert summary["metrics"][metric]["mean"] == pytest.approx(per_image[metric].mean(), rel=1e-12)
        for entry in [summary, *(entry for entry in summary["strata"] if entry["images"])]:
            assert entry["metrics"][metric]["low"] <= entry["metrics"][metric]["mean"] <= \
                entry["metrics"][metric]["high"]
    gap = summary["largest_gap"]["psnr_lab"]
    assert (gap["highest"], gap["lowest"]) == ("very light", "tan")
    assert gap["gap"] == pytest.approx(by_name["very light"]["metrics"]["psnr_lab"]["mean"]
                                       - by_name["tan"]["metrics"]["psnr_lab"]["mean"], rel=1e-12)
    assert 2.5 < gap["low"] < gap["gap"] < gap["high"] < 3.5
    assert summarise(per_image, ita, min_stratum_images=20) == summary  # seeded: the same card twice
    assert summarise(per_image, ita, min_stratum_images=2)["largest_gap"]["psnr_lab"]["lowest"] == "dark"
    assert summarise(per_image, ita, min_stratum_images=51)["largest_gap"] == {}
