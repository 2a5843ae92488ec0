"""Skin-tone strata and bootstrap intervals: ITA of constructed faces, the six bins, and strata that add up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from colorize_dist.eval import intervals, strata
from colorize_dist.eval.card import Strata, paired_differences, summarise
from colorize_dist.eval.names import FACE_REGION

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
    angle, pixels, fraction = strata.skin_estimate(face(ita)[None], "frame")
    assert angle.item() == pytest.approx(ita, abs=1e-9)
    assert pixels.item() == 14 * 20 and fraction.item() == pytest.approx(14 / 20)  # skin and lips pass the mask
    assert strata.STRATA[strata.stratum_of(angle.numpy())[0]] == stratum


def test_images_without_enough_skin_are_undetermined():
    """Under 25 % of the region or under 50 pixels: no ITA (9 of 40 rows is 22.5 %; 3 of 12 rows is 25 % but 36
    pixels)."""
    images = torch.stack([face(30.0, skin_rows=0, lip_rows=0, side=40), face(30.0, skin_rows=9, lip_rows=0, side=40),
                          face(30.0, skin_rows=10, lip_rows=0, side=40)])
    angles, pixels, fraction = strata.skin_estimate(images, "frame")
    assert pixels.tolist() == [0, 360, 400] and fraction.tolist() == [0.0, 0.225, 0.25]
    assert torch.isnan(angles[:2]).all() and angles[2].item() == pytest.approx(30.0, abs=1e-9)
    small = face(30.0, skin_rows=3, lip_rows=0, side=12)[None]  # 25 % of the frame, but 36 pixels
    assert torch.isnan(strata.skin_estimate(small, "frame")[0]).all()
    assert [strata.STRATA[i] for i in strata.stratum_of(angles.numpy())] == [strata.UNDETERMINED] * 2 + ["intermediate"]


def test_the_face_region_reads_the_face_not_the_hair_or_the_door():
    """An aligned face crop: light skin (ITA 50) in the middle, auburn hair above and a brown door at the sides
    (both pass the skin mask, ITA −40) over most of the frame. The whole frame reads "dark"; the face region
    reads the face."""
    side = 40
    lab = torch.empty(3, side, side, dtype=torch.float64)
    lab[:] = torch.tensor([50.0 + SKIN_B * math.tan(math.radians(-40.0)), 18.0, SKIN_B],
                          dtype=torch.float64)[:, None, None]
    left, top, right, bottom = (round(bound * side) for bound in FACE_REGION)
    lab[:, top - 2:bottom + 2, left - 1:right + 1] = torch.tensor(
        [50.0 + SKIN_B * math.tan(math.radians(50.0)), SKIN_A, SKIN_B], dtype=torch.float64)[:, None, None]
    frame_ita, frame_pixels, _ = strata.skin_estimate(lab[None], "frame")
    face_ita, face_pixels, face_fraction = strata.skin_estimate(lab[None], "face")
    assert strata.STRATA[strata.stratum_of(frame_ita.numpy())[0]] == "dark" and frame_pixels.item() == side * side
    assert face_ita.item() == pytest.approx(50.0, abs=1e-9) and face_fraction.item() == 1.0
    assert face_pixels.item() == (bottom - top) * (right - left) == 14 * 18


def test_bin_edges_follow_the_standard_categories():
    """Lower bounds excluded, upper included: > 55 very light, 41–55 light, …, ≤ −30 dark."""
    angles = np.array([55.0001, 55.0, 41.0001, 41.0, 28.0001, 28.0, 10.0, -29.9999, -30.0, -90.0, math.nan])
    expected = ["very light", "light", "light", "intermediate", "intermediate", "tan", "brown", "brown", "dark",
                "dark", strata.UNDETERMINED]
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

    summary = summarise(per_image, Strata.from_ita(ita), min_stratum_images=20)
    by_name = {entry["stratum"]: entry for entry in summary["strata"]}
    assert [entry["stratum"] for entry in summary["strata"]] == list(strata.STRATA)
    assert {name: entry["images"] for name, entry in by_name.items()} == {
        "very light": 60, "light": 0, "intermediate": 0, "tan": 50, "brown": 0, "dark": 3, strata.UNDETERMINED: 7}
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
    assert summary["left_out_of_gaps"] == [{"stratum": "dark", "images": 3, "why": "fewer than 20 images"},
                                           {"stratum": strata.UNDETERMINED, "images": 7,
                                            "why": "fewer than 20 images"}]
    assert summarise(per_image, Strata.from_ita(ita), min_stratum_images=20) == summary  # seeded: the same twice
    assert summarise(per_image, Strata.from_ita(ita), min_stratum_images=2)["largest_gap"]["psnr_lab"]["lowest"] == \
        "dark"
    assert summarise(per_image, Strata.from_ita(ita), min_stratum_images=51)["largest_gap"] == {}


def test_the_undetermined_stratum_takes_part_in_the_gaps():
    """44 undetermined images with the worst PSNR: the gap names them (they were left out silently before)."""
    rng = np.random.default_rng(2)
    ita = np.concatenate([rng.uniform(56, 70, 60), rng.uniform(11, 27, 50), np.full(44, math.nan)])
    psnr = np.concatenate([np.full(60, 30.0), np.full(50, 29.0), np.full(44, 26.37)]) + rng.normal(0, 0.3, 154)
    summary = summarise({"psnr_lab": psnr}, Strata.from_ita(ita), min_stratum_images=20)
    gap = summary["largest_gap"]["psnr_lab"]
    assert (gap["highest"], gap["lowest"]) == ("very light", strata.UNDETERMINED)
    assert gap["gap"] == pytest.approx(psnr[:60].mean() - psnr[110:].mean(), rel=1e-12)
    assert summary["left_out_of_gaps"] == []


def test_paired_differences_are_the_bootstrap_of_the_same_images():
    """The paired interval resamples the same images for both: much narrower than the two means' intervals when
    the images vary more than the difference (as per-image PSNR does), and it equals the bootstrap of the
    per-image differences."""
    rng = np.random.default_rng(3)
    hardness = rng.normal(25.0, 4.0, 300)  # images vary by ±4 dB
    model, gray = hardness + 0.5 + rng.normal(0, 0.2, 300), hardness
    paired = paired_differences({"psnr_lab": model}, {"psnr_lab": gray})["psnr_lab"]
    resampled = intervals.bootstrap_means((model - gray)[:, None], stream=0)
    low, high = intervals.percentile_interval(resampled)
    assert paired == {"difference": pytest.approx((model - gray).mean(), rel=1e-12), "low": low[0], "high": high[0]}
    assert 0.45 < paired["low"] < paired["high"] < 0.55
    separate = summarise({"psnr_lab": model}, Strata.from_ita(np.full(300, 60.0)))["metrics"]["psnr_lab"]
    assert separate["high"] - separate["low"] > 10 * (paired["high"] - paired["low"])


def test_user_groups_replace_the_skin_tone_strata():
    keys = [f"faces_{index:03d}_png" for index in range(30)]  # the sample keys of faces/000.png ...
    groups = {f"faces/{index:03d}.png": "type I-II" for index in range(0, 12)}  # by path, as given to shards make
    groups |= {f"faces_{index:03d}_png": "type V-VI" for index in range(12, 27)}  # by sample key
    psnr = np.concatenate([np.full(12, 28.0), np.full(15, 25.0), np.full(3, 20.0)])
    summary = summarise({"psnr_lab": psnr}, Strata.from_groups(keys, groups), min_stratum_images=10)
    assert [(entry["stratum"], entry["images"]) for entry in summary["strata"]] == [
        ("type I-II", 12), ("type V-VI", 15), ("unlabelled", 3)]
    gap = summary["largest_gap"]["psnr_lab"]
    assert (gap["highest"], gap["lowest"], gap["gap"]) == ("type I-II", "type V-VI", pytest.approx(3.0))
    assert summary["left_out_of_gaps"] == [{"stratum": "unlabelled", "images": 3, "why": "images without a label"}]
