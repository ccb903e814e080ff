"""Bootstrap intervals cover at their nominal rate, paired tests agree with independent computations, the meter's
intervals and per-sample values are those of its samples, and trivial predictors score what they should."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from mtrobust_fast.analysis import statistics
from mtrobust_fast.evaluation import baselines
from mtrobust_fast.evaluation.metrics import VulnerabilityMeter, evaluate
from mtrobust_fast import tasks
from mtrobust_fast.tasks import classification


def test_bootstrap_interval_covers_the_true_mean_at_about_its_nominal_rate():
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for i in range(trials):
        values = rng.exponential(2.0, size=60)  # skewed, true mean 2
        _, low, high = statistics.mean_interval(values, resamples=500, seed=i)
        covered += low <= 2.0 <= high
    rate = covered / trials
    assert 0.89 <= rate <= 0.98, rate  # nominal 0.95; percentile intervals undercover a little on skewed data


def test_interval_drops_nan_and_degenerates_without_spread():
    assert statistics.mean_interval([1.0, math.nan, 3.0])[0] == 2.0
    assert statistics.mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in statistics.mean_interval([math.nan]))


def test_paired_permutation_p_value_equals_the_exact_sign_flip_enumeration():
    a = np.array([0.9, 1.4, 0.7, 1.1, 1.6, 0.8, 1.3, 1.2])
    b = np.array([0.5, 1.0, 0.9, 0.6, 1.0, 0.7, 0.8, 1.3])
    d = a - b
    observed = abs(d.mean())
    flips = [abs((d * np.array(signs)).mean()) for signs in itertools.product((1, -1), repeat=d.size)]
    exact = np.mean([f >= observed - 1e-12 for f in flips])
    result = statistics.paired_difference(a, b)
    assert result["p"] == pytest.approx(exact)
    assert result["difference"] == pytest.approx(d.mean()) and result["pairs"] == 8
    assert result["low"] <= d.mean() <= result["high"]


def test_paired_difference_keeps_only_complete_pairs_and_finds_a_real_effect():
    rng = np.random.default_rng(1)
    b = rng.normal(size=200)
    a = b - 0.3 + rng.normal(scale=0.2, size=200)
    a[0] = math.nan
    result = statistics.paired_difference(a, b)
    assert result["pairs"] == 199 and result["p"] < 0.001 and result["high"] < 0
    assert statistics.verdict(result) == "better" and statistics.verdict(result, lower_is_better=False) == "worse"
    same = statistics.paired_difference(b.copy(), b)
    assert same["p"] == 1.0 and statistics.verdict(same) == "no significant change"


def test_mcnemar_equals_the_binomial_test_of_the_discordant_pairs():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)
    b = np.array([0, 1, 0, 0, 0, 1, 0, 1, 1, 0], bool)
    result = statistics.mcnemar(a, b)
    assert (result["only_a"], result["only_b"]) == (4, 1)
    # exact two-sided binomial: P(X <= 1) + P(X >= 4) for X ~ Bin(5, 1/2)
    assert result["p"] == pytest.approx((1 + 5 + 5 + 1) / 32)
    assert result["p"] == pytest.approx(stats.binomtest(4, 5).pvalue)


def _meter_with(errors_clean, errors_adv):
    depth = tasks.get_task("d")
    meter = VulnerabilityMeter([depth], eps=0.03)
    for clean, adv in ((errors_clean[:5], errors_adv[:5]), (errors_clean[5:], errors_adv[5:])):
        n = len(clean)
        target = torch.zeros(n, 1, 2, 2)
        out_clean = torch.tensor(clean).sqrt().view(n, 1, 1, 1).expand(n, 1, 2, 2)
        out_adv = torch.tensor(adv).sqrt().view(n, 1, 1, 1).expand(n, 1, 2, 2)
        meter.update(evaluate({depth.name: out_clean}, {depth.name: target}, {}, [depth]),
                     {(depth.name,): evaluate({depth.name: out_adv}, {depth.name: target}, {}, [depth])})
    return meter, depth.name


def test_meter_intervals_and_per_sample_values_are_those_of_its_samples():
    clean = [0.1, 0.2, 0.4, 0.3, 0.5, 0.2, 0.1, 0.6, 0.3, 0.2]
    adv = [0.2, 0.5, 0.4, 0.9, 0.6, 0.3, 0.4, 0.9, 0.3, 0.8]
    meter, name = _meter_with(clean, adv)
    summary = meter.compute(intervals=True, per_sample=True)
    assert summary["per_sample"]["clean"][name]["error"] == pytest.approx(clean)
    assert summary["per_sample"]["attacks"]["d"][name]["error"] == pytest.approx(adv)
    entry = summary["attacks"]["d"]["tasks"][name]
    change = [(a - c) / c for a, c in zip(adv, clean)]
    assert entry["rel_vuln"] == pytest.approx(np.mean(change))
    assert entry["rel_vuln_ci"] == pytest.approx(list(statistics.mean_interval(change)[1:]))
    low, high = summary["clean"][name]["error_ci"]
    assert low < np.mean(clean) < high
    assert "error_ci" not in meter.compute()["clean"][name]


def test_trivial_predictors_score_background_mean_and_majority():
    seg, depth = tasks.get_task("s"), tasks.get_task("d")
    label = torch.ones(2, 4, 4, dtype=torch.long)
    label[0, :2] = 5  # a quarter of the pixels are class 5, the rest background
    values = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    batch = (torch.zeros(2, 3, 4, 4), {seg.name: label, depth.name: values}, {seg.name: mask, depth.name: mask})
    scores = baselines.trivial_scores([seg, depth], [batch], [batch])
    assert scores[seg.name]["predictor"] == "all-background"
    assert scores[seg.name]["pixel_acc"] == pytest.approx(24 / 32)
    assert scores[seg.name]["miou"] == pytest.approx((24 / 32 + 0) / 2)  # background IoU, class 5 IoU 0
    assert scores[depth.name]["predictor"] == "training mean"
    assert scores[depth.name]["mse"] == pytest.approx(1.0)  # mean 2: every pixel off by 1
    head = classification.ClassificationTask("class", 3)
    labels = torch.tensor([2, 2, 0, 2, 1])
    batch = (torch.zeros(5, 3, 4, 4), {"class": labels}, {})
    result = baselines.trivial_scores([head], [batch], [batch])["class"]
    assert result["predictor"] == "majority class" and result["accuracy"] == pytest.approx(3 / 5)


def test_compare_states_score_trivial_and_ratio():
    text = baselines.compare({"mse": 0.1, "l1": 0.2}, {"mse": 0.4, "l1": 0.4, "predictor": "x"},
                             {"mse": False, "l1": False})
    assert text == "mse 0.1 vs 0.4 (0.25x), l1 0.2 vs 0.4 (0.50x)"


def _runs(errors_a, errors_b, attacked="class", task="class"):
    from mtrobust_fast.analysis import per_sample

    def frame(errors):
        n = len(errors)
        return pd.DataFrame({"image": range(n), "attacked": attacked, "task": task, "clean_error": 0.0,
                             "clean_loss": 0.0, "adv_error": errors, "adv_loss": errors})
    return per_sample, frame(errors_a), frame(errors_b)


def test_per_image_comparison_uses_mcnemar_for_0_1_errors_and_only_the_paired_test_otherwise():
    per_sample, a, b = _runs([1.0] * 30 + [0.0] * 70, [0.0] * 10 + [1.0] * 20 + [0.0] * 70)
    (result,) = per_sample.compare(a, b)
    assert result["mcnemar"] == stats_reference_mcnemar(0, 10) and result["difference"] == pytest.approx(0.1)
    per_sample, a, b = _runs([0.5, 0.2, 0.9], [0.4, 0.2, 0.1])
    (result,) = per_sample.compare(a, b, "adv_loss")
    assert "mcnemar" not in result and result["pairs"] == 3


def test_per_image_comparison_refuses_runs_on_different_images_or_sets():
    per_sample, a, b = _runs([0.0] * 5, [0.0] * 6)
    with pytest.raises(ValueError, match="same images"):
        per_sample.compare(a, b)
    per_sample, a, b = _runs([0.0] * 5, [0.0] * 5)
    with pytest.raises(ValueError, match="share no attacked set"):
        per_sample.compare(a, b.assign(attacked="other"))
    with pytest.raises(ValueError, match="value must be one of"):
        per_sample.compare(a, b, "accuracy")


def stats_reference_mcnemar(only_a, only_b):
    return {"only_a": only_a, "only_b": only_b, "p": stats.binomtest(only_a, only_a + only_b, 0.5).pvalue}


def test_metric_interval_from_summed_statistics_covers_a_pooled_ratio_at_about_its_nominal_rate():
    """The bootstrap of a dataset-level metric (here a pooled MSE: sum of squared errors over sum of pixels, as
    dense_scores computes it) covers the true value at about the nominal rate."""
    rng = np.random.default_rng(1)
    trials, covered = 200, 0
    scores = lambda summed: {"mse": summed[0] / summed[1]}
    for i in range(trials):
        pixels = rng.integers(50, 150, size=60).astype(float)  # images of different valid areas
        squared = rng.chisquare(pixels)  # per pixel error ~ N(0, 1): the true pooled MSE is 1
        (low, high), = statistics.statistic_interval(np.stack([squared, pixels], 1), scores, resamples=400,
                                                     seed=i).values()
        covered += low <= 1.0 <= high
    assert 0.89 <= covered / trials <= 0.99, covered / trials


def test_an_accuracy_interval_from_counts_matches_the_interval_of_the_0_1_values():
    right = np.r_[np.ones(70), np.zeros(30)]
    (low, high), = statistics.statistic_interval(np.stack([right, np.ones(100)], 1),
                                                 lambda s: {"accuracy": s[0] / s[1]}).values()
    _, ref_low, ref_high = statistics.mean_interval(right)
    assert abs(low - ref_low) <= 0.02 and abs(high - ref_high) <= 0.02


def test_the_meter_gives_segmentation_and_classification_metrics_intervals_over_images():
    torch.manual_seed(0)
    seg, cls = tasks.get_task("s"), classification.ClassificationTask("class", 4)
    meter = VulnerabilityMeter([seg, cls], eps=0.1)
    for _ in range(3):
        target = torch.randint(0, 18, (8, 16, 16))
        logits = torch.randn(8, 18, 16, 16) + 4 * torch.nn.functional.one_hot(target, 18).permute(0, 3, 1, 2) \
            * (torch.rand(8, 1, 1, 1) > 0.5)  # half the images right everywhere
        labels = torch.randint(0, 4, (8,))
        outputs = {seg.name: logits, "class": torch.randn(8, 4)}
        targets, masks = {seg.name: target, "class": labels}, {seg.name: torch.ones(8, 1, 16, 16, dtype=torch.bool)}
        clean = evaluate(outputs, targets, masks, [seg, cls])
        meter.update(clean, {(seg.name,): evaluate(outputs, targets, masks, [seg, cls])})
    summary = meter.compute(intervals=True)
    for name, metric in ((seg.name, "miou"), ("class", "accuracy")):
        low, high = summary["clean"][name][f"{metric}_ci"]
        assert low < summary["clean"][name][metric] < high
        assert summary["attacks"]["s"]["tasks"][name][f"adv_{metric}_ci"] == [low, high]  # same outputs, same draws
    assert "miou_ci" not in meter.compute()["clean"][seg.name]
