"""Paired bootstrap intervals and verdicts (recbole_cmr.stats) on data whose answer is known."""

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from recbole_cmr import stats

FAST = dict(n_resamples=999, seed=0)


def _users(n, shift, rng, noise=0.05):
    """Skewed per-user values of B (most users 0) and A = B + shift + noise, each ``(n,)``."""
    b = rng.exponential(0.2, n) * (rng.random(n) < 0.4)
    return b + shift + rng.normal(0, noise, n), b


def _verdict(result, **kwargs):
    return stats.verdict(result.ci_low, result.ci_high, **kwargs)


def test_clear_gain_is_met_identical_is_level_loss_is_missed():
    rng = np.random.default_rng(1)
    a, b = _users(300, 0.03, rng)
    assert _verdict(stats.paired_difference(a, b, **FAST)) == "met"
    assert _verdict(stats.paired_difference(b, a, **FAST)) == "missed"
    same = stats.paired_difference(b, b.copy(), **FAST)
    assert (same.diff, same.ci_low, same.ci_high, same.method) == (0, 0, 0, "degenerate")
    assert _verdict(same) == "level"
    noisy, _ = _users(300, 0.0, np.random.default_rng(1))
    noisy_result = stats.paired_difference(noisy, b, **FAST)
    assert noisy_result.ci_low < 0 < noisy_result.ci_high and _verdict(noisy_result) == "level"


def test_one_stratum_is_scipy_paired_bootstrap_exactly():
    a, b = _users(200, 0.01, np.random.default_rng(2))
    ours = stats.paired_difference(a, b, **FAST)
    theirs = scipy_stats.bootstrap(
        (a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True, n_resamples=999,
        batch=max(1, stats.BATCH_ELEMENTS // (2 * a.size)), rng=np.random.default_rng(0))
    assert (ours.ci_low, ours.ci_high) == tuple(theirs.confidence_interval)
    assert ours.method == "BCa" and ours.diff == pytest.approx(np.mean(a - b)) and ours.n == 200


def test_interval_covers_the_true_difference_on_most_draws():
    rng = np.random.default_rng(3)
    covered = 0
    for draw in range(20):
        a, b = _users(150, 0.02, rng, noise=0.1)
        result = stats.paired_difference(a, b, n_resamples=499, seed=draw)
        covered += result.ci_low <= 0.02 <= result.ci_high
    assert covered >= 16  # 95 % intervals: 19 of 20 expected, 16 or fewer has probability < 2 %


def test_pairing_aligns_by_user_and_names_what_is_missing():
    rng = np.random.default_rng(4)
    users = np.array([f"u{i}" for i in range(100)])
    a, b = _users(100, 0.03, rng, noise=0.0)
    shuffled = rng.permutation(100)
    units, aligned_a, aligned_b = stats.pair_by_unit(users, a, users[shuffled], b[shuffled])
    np.testing.assert_array_equal(units, users)
    np.testing.assert_allclose(aligned_a - aligned_b, 0.03)
    result = stats.paired_difference(aligned_a, aligned_b, **FAST)
    assert result.ci_high - result.ci_low < 1e-9  # every user gains exactly 0.03
    with pytest.raises(ValueError, match=r"1 only in A \[u99\], 1 only in B \[v7\]"):
        stats.pair_by_unit(users, a, np.r_[users[:99], ["v7"]], b)
    with pytest.raises(ValueError, match=r"run B repeats units \[u1\]"):
        stats.pair_by_unit(users[:3], a[:3], users[[1, 1, 0]], b[:3])
    with pytest.raises(ValueError, match="one value per unit"):
        stats.pair_by_unit(users, a[:5], users, b)


def test_seeds_pair_one_to_one_and_pool_per_user():
    rng = np.random.default_rng(5)
    users = np.array([f"u{i}" for i in range(50)])
    runs_a = {seed: (users[::-1], rng.random(50)) for seed in (2020, 2021)}
    runs_b = {seed: (users, rng.random(50)) for seed in (2021, 2020)}
    units, a, b = stats.pool_seeds(runs_a, runs_b)
    assert a.shape == b.shape == (2, 50)
    np.testing.assert_array_equal(a[1], runs_a[2021][1])
    np.testing.assert_array_equal(b[0, ::-1], runs_b[2020][1])
    pooled = stats.paired_difference(a, b, **FAST)
    assert pooled.diff == pytest.approx(np.mean(a.mean(axis=0) - b.mean(axis=0)))
    with pytest.raises(ValueError, match=r"A ran \[2020, 2021\], B ran \[2020\]"):
        stats.pool_seeds(runs_a, {2020: runs_b[2020]})
    with pytest.raises(ValueError, match="B seed 2021: the runs hold different units"):
        stats.pool_seeds(runs_a, {**runs_b, 2021: (users[:49], runs_b[2021][1][:49])})


def test_macro_weights_markets_equally_and_resamples_within_them():
    rng = np.random.default_rng(6)
    big = _users(2000, 0.0, rng, noise=0.01)
    small = _users(40, 0.1, rng, noise=0.01)
    result = stats.macro_paired_difference({"big": big, "small": small}, **FAST)
    per_market = [np.mean(a - b) for a, b in (big, small)]
    assert result.diff == pytest.approx(np.mean(per_market))
    assert result.ci_low <= result.diff <= result.ci_high and result.ci_low > 0.04
    assert result.n == 2040
    pooled_users = stats.paired_difference(np.r_[big[0], small[0]], np.r_[big[1], small[1]],
                                           **FAST)
    assert pooled_users.ci_high < 0.01  # pooling users would let the big market dominate


def test_ratio_target_reads_its_threshold():
    rng = np.random.default_rng(7)
    b = rng.exponential(0.2, 400) + 0.01
    met = stats.paired_difference(1.25 * b, b, contrast="ratio", **FAST)
    assert met.diff == pytest.approx(1.25) and _verdict(met, threshold=1.10) == "met"
    short = stats.paired_difference(b * rng.normal(1.0, 0.05, 400), b, contrast="ratio", **FAST)
    assert _verdict(short, threshold=1.10) == "missed"
    with pytest.raises(ValueError, match="contrast must be one of"):
        stats.paired_difference(b, b, contrast="median")


def test_verdict_edges_and_lower_is_better():
    assert stats.verdict(0.0, 0.2) == "level"  # touching the threshold is not met
    assert stats.verdict(-0.3, -0.1, bigger_is_better=False) == "met"
    assert stats.verdict(0.1, 0.3, bigger_is_better=False) == "missed"
    with pytest.raises(ValueError, match="finite interval"):
        stats.verdict(float("nan"), 0.1)


def _rows(n, rng, seeds=1):
    """Labels ``(n,)`` and scores ``(seeds, n)`` of a good A and a weaker, tied B."""
    labels = (rng.random(n) < 0.3).astype(int)
    scores_a = labels + rng.normal(0, 0.6, (seeds, n))
    scores_b = np.round(labels + rng.normal(0, 1.5, (seeds, n)), 1)
    return labels, scores_a, scores_b


def test_auc_difference_on_rows_matches_sklearn_and_pools_seeds():
    labels, scores_a, scores_b = _rows(600, np.random.default_rng(8), seeds=2)
    result = stats.auc_difference(labels, scores_a, scores_b, **FAST)
    expected = np.mean([roc_auc_score(labels, a) - roc_auc_score(labels, b)
                        for a, b in zip(scores_a, scores_b)])
    assert result.diff == pytest.approx(expected)
    assert _verdict(result) == "met" and result.n == 600
    ratio = stats.auc_difference(labels, scores_a[0], scores_b[0], contrast="ratio", **FAST)
    assert ratio.diff == pytest.approx(roc_auc_score(labels, scores_a[0])
                                       / roc_auc_score(labels, scores_b[0]))
    assert ratio.ci_low < ratio.diff < ratio.ci_high
    with pytest.raises(ValueError, match="stratum all: every row has label 1"):
        stats.auc_difference(np.ones(5), scores_a[0, :5], scores_b[0, :5])


def test_macro_auc_averages_strata_and_rows_pair_across_runs():
    rng = np.random.default_rng(9)
    strata = {"young": _rows(300, rng), "old": _rows(100, rng)}
    result = stats.macro_auc_difference(strata, **FAST)
    expected = np.mean([roc_auc_score(y, a[0]) - roc_auc_score(y, b[0])
                        for y, a, b in strata.values()])
    assert result.diff == pytest.approx(expected)
    labels, scores_a, scores_b = strata["young"]
    users = np.repeat(np.arange(100), 3)  # rows repeat users: paired by position
    runs_a = {0: (users, np.stack([labels, scores_a[0]]))}
    runs_b = {0: (users, np.stack([labels, scores_b[0]]))}
    split = stats.split_rows(*stats.pool_seeds(runs_a, runs_b)[1:])
    assert stats.auc_difference(*split, **FAST) == stats.auc_difference(
        labels, scores_a, scores_b, **FAST)
    flipped = {0: (users, np.stack([1 - labels, scores_b[0]]))}
    with pytest.raises(ValueError, match="run B labels 300 rows differently"):
        stats.split_rows(*stats.pool_seeds(runs_a, flipped)[1:])


def test_a_multi_task_stratum_averages_its_tasks_on_rows_drawn_once():
    rng = np.random.default_rng(10)
    click, ctcvr = _rows(400, rng), _rows(400, rng)
    ctcvr = (ctcvr[0], ctcvr[1][:1], ctcvr[2][:1])
    click = (click[0], click[1][:1], click[2][:1])
    both = stats.macro_auc_difference({"s": [click, ctcvr]}, **FAST)
    expected = np.mean([roc_auc_score(y, a[0]) - roc_auc_score(y, b[0]) for y, a, b in (click, ctcvr)])
    assert both.diff == pytest.approx(expected)
    # Two copies of one task are that task: the rows are drawn once for both, so the interval is
    # the one task's exactly (two independent draws would narrow it).
    assert stats.macro_auc_difference({"s": [click, click]}, **FAST) == stats.auc_difference(*click, **FAST)
    with pytest.raises(ValueError, match="stratum s: its tasks hold different rows"):
        stats.macro_auc_difference({"s": [click, tuple(x[..., :200] for x in ctcvr)]}, **FAST)


def test_leave_one_out_auc_is_the_auc_without_that_row():
    labels, _, scores = _rows(300, np.random.default_rng(13))  # B's scores: many ties
    ranked = stats._rank(scores[0], np.flatnonzero(labels == 1), np.flatnonzero(labels == 0))
    assert ranked.auc == pytest.approx(roc_auc_score(labels, scores[0]), abs=1e-12)
    expected = [roc_auc_score(np.delete(labels, i), np.delete(scores[0], i)) for i in range(300)]
    np.testing.assert_allclose(ranked.left_out, expected, rtol=0, atol=1e-12)
    assert np.isnan(stats._rank(np.arange(4.0), np.array([1]), np.array([0, 2, 3])).left_out[1])


def test_a_resample_weights_rows_by_their_multiplicity():
    rng = np.random.default_rng(16)
    labels, scores_a, scores_b = _rows(400, rng)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    resamples = rng.integers(0, 400, (5, 400))
    for scores in (scores_a[0], scores_b[0]):  # continuous, and tied
        aucs = stats._resampled_auc(resamples, 400)(positives)(stats._rank(scores, positives, negatives))
        counts = [np.bincount(row, minlength=400) for row in resamples]
        expected = [roc_auc_score(labels, scores, sample_weight=c) for c in counts]
        np.testing.assert_allclose(aucs, expected, rtol=0, atol=1e-12)


def test_bca_jackknife_in_closed_form_gives_the_resampling_interval(monkeypatch):
    rng = np.random.default_rng(14)
    strata = {"young": [_rows(200, rng, seeds=2), _rows(200, rng, seeds=2)],
              "old": [_rows(90, rng, seeds=2), _rows(90, rng, seeds=2)]}
    strata = {name: [(tasks[0][0], *tasks[1][1:]), tasks[1]] for name, tasks in strata.items()}
    exact = stats.macro_auc_difference(strata, **FAST)
    monkeypatch.setattr(stats, "_exact_auc", lambda flat, n: None)  # weight every sample
    weighted = stats.macro_auc_difference(strata, **FAST)
    assert exact.method == weighted.method == "BCa"
    np.testing.assert_allclose([exact.diff, exact.ci_low, exact.ci_high],
                               [weighted.diff, weighted.ci_low, weighted.ci_high], rtol=1e-9)


def test_the_jackknife_weights_no_sample_only_the_resamples_are(monkeypatch):
    """BCa's jackknife reads the closed-form leave-one-out AUCs: weighting its samples made it
    quadratic in the rows (70 s on scenarios of 20,000 and 7,000 rows; 4 s read in closed form;
    PF-MSMTrec's gender split has 37,000 and 13,000)."""
    weighted = []
    resampled_auc = stats._resampled_auc

    def spy(flat, n):
        weighted.append(flat.shape)
        return resampled_auc(flat, n)

    monkeypatch.setattr(stats, "_resampled_auc", spy)
    rng = np.random.default_rng(15)
    strata = {"male": [_rows(2_000, rng)] * 2, "female": _rows(700, rng)}
    result = stats.macro_auc_difference(strata, n_resamples=99, seed=0)
    assert result.method == "BCa"
    assert {n for _, n in weighted} == {2_000, 700}  # resamples of full size only
    assert sum(rows for rows, n in weighted if n == 2_000) == 99


def _user_rows(n_users, rng, seeds=1, rows_per_user=None):
    """Rows of ``n_users`` users (``rows_per_user`` each, else 2-7) with user tokens, labels
    ``(n,)`` and the scores of a good A and a weaker B ``(seeds, n)``."""
    sizes = np.full(n_users, rows_per_user) if rows_per_user else rng.integers(2, 8, n_users)
    users = np.repeat([f"u{i}" for i in range(n_users)], sizes)
    labels, scores_a, scores_b = _rows(users.size, rng, seeds)
    return users, labels, scores_a, scores_b


def test_group_auc_weights_users_by_rows_and_resamples_users():
    from recbole_cmr.evaluator import ctr_gauc

    users, labels, scores_a, scores_b = _user_rows(150, np.random.default_rng(11))
    result = stats.macro_gauc_difference({"t": (users, labels, scores_a, scores_b)}, **FAST)
    expected = ctr_gauc(scores_a[0], labels, users) - ctr_gauc(scores_b[0], labels, users)
    assert result.diff == pytest.approx(expected)
    auc, impressions = stats.per_user_auc(scores_a[0], labels, users)
    assert result.n == auc.size < 150  # users with one class only have no AUC
    assert _verdict(result) == "met"
    # With equal rows per user, the group AUC is the mean user AUC: resampling users is then
    # exactly the paired bootstrap of the per-user AUCs.
    users, labels, scores_a, scores_b = _user_rows(120, np.random.default_rng(12), rows_per_user=4)
    equal = stats.macro_gauc_difference({"t": (users, labels, scores_a, scores_b)}, **FAST)
    per_user = [stats.per_user_auc(s[0], labels, users)[0].to_numpy() for s in (scores_a, scores_b)]
    assert equal == stats.paired_difference(*per_user, **FAST)
