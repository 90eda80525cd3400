"""Paired t-test, Cohen's d_z, bootstrap CI, Holm / BH correction and compare_methods."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from contrastive_saliency.stats import (
    benjamini_hochberg,
    bootstrap_ci,
    cohens_d_paired,
    compare_methods,
    holm,
    mean_confidence_interval,
    paired_t_test,
    wilcoxon_below,
)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_paired_t_test_matches_scipy(alternative):
    rng = np.random.default_rng(1)
    a = rng.normal(0.3, 1.0, 40)
    b = a - rng.normal(0.2, 0.5, 40)
    ours = paired_t_test(a, b, alternative=alternative)
    ref = stats.ttest_rel(a, b, alternative=alternative)
    assert ours.n == 40
    assert abs(ours.statistic - ref.statistic) < 1e-10
    assert abs(ours.p_value - ref.pvalue) < 1e-10


def test_paired_t_test_degenerate_and_bad_input():
    same = paired_t_test(np.ones(5), np.ones(5))
    assert math.isnan(same.statistic) and same.p_value == 1.0
    shifted = paired_t_test(np.ones(5) + 1, np.ones(5), alternative="greater")
    assert shifted.statistic == math.inf and shifted.p_value == 0.0
    assert paired_t_test(np.ones(5) + 1, np.ones(5), alternative="less").p_value == 1.0
    assert math.isnan(paired_t_test([1.0], [2.0]).p_value)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_test(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="alternative"):
        paired_t_test(np.ones(3), np.ones(3), alternative="bigger")


def test_cohens_d_paired_closed_form():
    a = np.array([3.0, 5.0, 7.0, 9.0])
    b = np.array([1.0, 2.0, 3.0, 4.0])
    d = a - b  # [2, 3, 4, 5]: mean 3.5, sd (ddof=1) sqrt(5/3)
    assert cohens_d_paired(a, b) == pytest.approx(3.5 / math.sqrt(5.0 / 3.0), abs=1e-12)
    assert cohens_d_paired(b, a) == pytest.approx(-3.5 / d.std(ddof=1), abs=1e-12)
    # d_z · √n is the paired t statistic.
    t = stats.ttest_rel(a, b).statistic
    assert cohens_d_paired(a, b) * math.sqrt(4) == pytest.approx(t, abs=1e-10)
    assert cohens_d_paired(np.ones(3), np.ones(3)) == 0.0


def test_wilcoxon_below_matches_scipy():
    rng = np.random.default_rng(2)
    values = rng.uniform(0, 1, 30)
    ours = wilcoxon_below(values, 0.7)
    ref = stats.wilcoxon(values - 0.7, alternative="less")
    assert abs(ours.p_value - ref.pvalue) < 1e-10


def test_bootstrap_ci_reproducible_and_covers_mean():
    rng = np.random.default_rng(3)
    values = rng.exponential(2.0, 200)
    first = bootstrap_ci(values, level=0.95, n_resamples=4000, seed=7)
    again = bootstrap_ci(values, level=0.95, n_resamples=4000, seed=7)
    other = bootstrap_ci(values, level=0.95, n_resamples=4000, seed=8)
    assert first == again
    assert first != other
    low, high = first
    assert low < values.mean() < high
    # Chunking does not change the draws' distribution much and a narrower level is nested.
    chunked = bootstrap_ci(values, n_resamples=4000, seed=7, max_chunk_elements=1000)
    assert chunked[0] < values.mean() < chunked[1]
    narrow = bootstrap_ci(values, level=0.5, n_resamples=4000, seed=7)
    assert low < narrow[0] < narrow[1] < high
    # Close to the t interval for a sample this large.
    t_low, t_high = mean_confidence_interval(values)
    assert abs(low - t_low) < 0.15 and abs(high - t_high) < 0.15
    assert bootstrap_ci([4.0], seed=0) == (4.0, 4.0)
    assert all(math.isnan(v) for v in bootstrap_ci([], seed=0))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(values, level=95)


def _holm_reference(p):
    """Plain-loop Holm step-down: reject in order while p_(j) ≤ α/(m − j + 1)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def test_holm_matches_reference_loop():
    rng = np.random.default_rng(4)
    for size in (1, 2, 5, 17):
        p = rng.uniform(0, 0.2, size)
        np.testing.assert_allclose(holm(p), _holm_reference(list(p)), rtol=0, atol=1e-15)
    ties = np.array([0.01, 0.04, 0.01, 0.03, 0.5])
    np.testing.assert_allclose(holm(ties), _holm_reference(list(ties)), rtol=0, atol=1e-15)
    assert holm(np.array([0.9, 0.8])).max() == 1.0  # capped


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(5)
    for size in (1, 3, 10, 50):
        p = rng.uniform(0, 1, size) ** 3
        np.testing.assert_allclose(
            benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"), rtol=0, atol=1e-12
        )
    ties = np.array([0.01, 0.04, 0.01, 0.03, 0.5])
    np.testing.assert_allclose(
        benjamini_hochberg(ties), stats.false_discovery_control(ties), rtol=0, atol=1e-12
    )


def test_corrections_monotone_keep_order_and_nan():
    p = np.array([0.04, 0.001, np.nan, 0.03, 0.2])
    for correct in (holm, benjamini_hochberg):
        adjusted = correct(p)
        assert math.isnan(adjusted[2])
        finite = ~np.isnan(p)
        assert np.all(adjusted[finite] >= p[finite])
        assert np.all(adjusted[finite] <= 1.0)
        order = np.argsort(p[finite])
        assert np.all(np.diff(adjusted[finite][order]) >= 0)
        # NaN does not count towards m: same as correcting the finite ones alone.
        np.testing.assert_allclose(adjusted[finite], correct(p[finite]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm(np.array([1.5]))


def test_compare_methods_inner_join_and_parity():
    rng = np.random.default_rng(6)
    n = 30
    ref = rng.uniform(0, 1, n)
    a = ref + rng.normal(0.1, 0.1, n)
    b = ref + rng.normal(-0.05, 0.2, n)
    rows = [("case", i, v) for i, v in enumerate(ref)]
    rows += [("grad_cam", i, v) for i, v in enumerate(a)]
    # "finer" misses samples 0..4 and has an extra sample 99: only the shared 25 must pair.
    rows += [("finer", i, v) for i, v in enumerate(b) if i >= 5] + [("finer", 99, 5.0)]
    frame = pd.DataFrame(rows, columns=["method", "index", "value"]).sample(frac=1, random_state=0)
    out = compare_methods(frame, "case", alternative="method_greater", threshold=0.7)
    assert sorted(out["method"]) == ["finer", "grad_cam"]
    out = out.set_index("method")
    assert out.loc["grad_cam", "n"] == 30 and out.loc["finer", "n"] == 25
    t_a = stats.ttest_rel(a, ref, alternative="greater")
    t_b = stats.ttest_rel(b[5:], ref[5:], alternative="greater")
    assert abs(out.loc["grad_cam", "t_p_value"] - t_a.pvalue) < 1e-10
    assert abs(out.loc["finer", "t_p_value"] - t_b.pvalue) < 1e-10
    assert abs(out.loc["finer", "t_statistic"] - t_b.statistic) < 1e-10
    assert out.loc["finer", "mean"] == pytest.approx(b[5:].mean())
    assert out.loc["finer", "reference_mean"] == pytest.approx(ref[5:].mean())
    assert out.loc["grad_cam", "cohens_d"] == pytest.approx(cohens_d_paired(a, ref))
    w = stats.wilcoxon(b[5:] - 0.7, alternative="less")
    assert abs(out.loc["finer", "wilcoxon_p"] - w.pvalue) < 1e-10
    ps = out[["t_p_value"]].to_numpy().ravel()
    np.testing.assert_allclose(out["t_p_holm"], holm(ps))
    np.testing.assert_allclose(out["t_p_bh"], stats.false_discovery_control(ps))
    assert "case" not in out.index
    assert out.loc["finer", "hypothesis"] == (
        "H1: mean(finer − case) > 0 (finer's mean is higher than case's; one-sided)"
    )


def _fabricated_drops(case_higher: bool) -> pd.DataFrame:
    """Per-sample confidence drops of CASE and two baselines on 40 samples; CASE's are clearly
    larger (or clearly smaller) than each baseline's."""
    rng = np.random.default_rng(7)
    baseline = rng.uniform(0.1, 0.5, 40)
    case = baseline + (1 if case_higher else -1) * rng.uniform(0.05, 0.15, 40)
    noise = rng.normal(0.0, 0.01, 40)
    return pd.DataFrame(
        [("case", i, v) for i, v in enumerate(case)]
        + [("grad_cam", i, v) for i, v in enumerate(baseline)]
        + [("layer_cam", i, v) for i, v in enumerate(baseline + noise)],
        columns=["method", "index", "value"],
    )


def test_case_eq9_direction_is_method_less_with_case_as_reference():
    # CASE Eq. 9: H1: Mean(D_CASE) > Mean(D_baseline), CASE the reference method of stats.csv.
    paper = compare_methods(_fabricated_drops(case_higher=True), "case", alternative="method_less")
    assert (paper["t_p_value"] < 1e-6).all()  # the paper's one-sided test rejects H0
    assert paper["hypothesis"].str.startswith("H1: mean(").all()
    assert (
        "grad_cam's mean confidence_drop is lower than case's"
        in compare_methods(
            _fabricated_drops(True), "case", alternative="method_less", metric="confidence_drop"
        )
        .set_index("method")
        .loc["grad_cam", "hypothesis"]
    )
    # The other direction does not reject when CASE's drops are the larger ones ...
    wrong_side = compare_methods(_fabricated_drops(True), "case", alternative="method_greater")
    assert (wrong_side["t_p_value"] > 0.999).all()
    # ... and the paper's test does not reject when CASE's drops are the smaller ones.
    reversed_ = compare_methods(_fabricated_drops(False), "case", alternative="method_less")
    assert (reversed_["t_p_value"] > 0.999).all()
    two_sided = compare_methods(_fabricated_drops(False), "case", alternative="two_sided")
    assert (two_sided["t_p_value"] < 1e-6).all()


@pytest.mark.parametrize("old", ["greater", "less", "two-sided", "bigger"])
def test_old_or_unknown_alternatives_fail_naming_the_new_ones(old):
    frame = _fabricated_drops(True)
    with pytest.raises(ValueError, match="two_sided, method_greater, method_less"):
        compare_methods(frame, "case", alternative=old)


def test_compare_methods_errors_name_the_problem():
    frame = pd.DataFrame({"method": ["a", "b"], "index": [0, 0], "value": [1.0, 2.0]})
    with pytest.raises(ValueError, match="'zzz'"):
        compare_methods(frame, "zzz")
    with pytest.raises(ValueError, match="score"):
        compare_methods(frame.rename(columns={"value": "score"}), "a")
    with pytest.raises(ValueError, match="repeats"):
        compare_methods(pd.concat([frame, frame]), "a")
    no_threshold = compare_methods(frame, "a")
    assert math.isnan(no_threshold.loc[0, "wilcoxon_p"])


def test_stats_table_against_several_references_is_corrected_as_one_family():
    """``method_tests`` with references [grad_cam, edge]: rows per (method, reference), the
    pair of references tested once, the layer-free reference paired at the layer and the
    layer-free methods once (under "input"), Holm / BH over the whole table."""
    from callbacks.evaluation.tables import method_tests

    rng = np.random.default_rng(3)
    n = 25
    rows = []
    values = {
        ("grad_cam", "features.3"): rng.uniform(0, 1, n),
        ("case", "features.3"): rng.uniform(0, 1, n),
        ("edge", "input"): rng.uniform(0, 1, n),
        ("random", "input"): rng.uniform(0, 1, n),
    }
    for metric, shift in (("mark_energy", 0.0), ("object_energy", 0.3)):
        for (method, layer), v in values.items():
            rows += [(method, layer, "top1", metric, i, x + shift) for i, x in enumerate(v)]
    per_sample = pd.DataFrame(
        rows, columns=["method", "layer", "target_policy", "metric", "index", "value"]
    )
    table = method_tests(per_sample, ["grad_cam", "edge"], agreement_threshold=0.5)
    pairs = set(zip(table["layer"], table["method"], table["reference"], strict=True))
    assert pairs == {
        ("features.3", "case", "grad_cam"), ("features.3", "edge", "grad_cam"),
        ("features.3", "random", "grad_cam"), ("features.3", "case", "edge"),
        ("input", "random", "edge"),
    }  # fmt: skip
    assert len(table) == 2 * len(pairs)  # both metrics
    row = table.query("method == 'random' and reference == 'edge' and metric == 'mark_energy'")
    expected = stats.ttest_rel(values[("random", "input")], values[("edge", "input")])
    assert row["t_p_value"].item() == pytest.approx(expected.pvalue, rel=1e-9)
    np.testing.assert_allclose(table["t_p_holm"], holm(table["t_p_value"].to_numpy()))
    np.testing.assert_allclose(
        table["t_p_bh"], stats.false_discovery_control(table["t_p_value"].to_numpy())
    )
    # one reference as a string: the former single-reference table
    single = method_tests(per_sample, "grad_cam", agreement_threshold=0.5)
    assert set(single["reference"]) == {"grad_cam"} and len(single) == 6
