"""The outcome comparison's statistics (tests/reference/compare_training.py), on made-up runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

pytest.importorskip("torch")
from tests.reference import compare_training as ct  # pylint: disable=wrong-import-position


def _runs(code: str, finals: list[float]) -> list[dict]:
  rows = []
  for seed, final in enumerate(finals):
    epoch = lambda v: dict({k: v / 5 for k in ct.RECALLS[:4]}, SumR=v, clip=dict(SumR=v + 1),
                           frame=dict(SumR=v - 1))
    rows.append(dict(code=code, seed=seed, epochs=[epoch(final / 2), epoch(final)]))
  return rows


def test_summary_statistics():
  authors = [290.0, 295.0, 300.0, 285.0, 292.0, 298.0]
  ours = [288.0, 250.0, 301.0, 294.0, 289.0, 297.0]  # one outlying seed
  s = ct._summary(_runs("authors", authors) + _runs("ours", ours), ("authors", "ours"), 2)
  c = s["comparison"]
  a, b = np.array(authors), np.array(ours)
  pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
  assert c["difference"] == pytest.approx(b.mean() - a.mean())
  assert c["difference_in_pooled_sd"] == pytest.approx((b.mean() - a.mean()) / pooled)
  assert c["welch_p"] == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)
  assert c["sd_ratio"] == pytest.approx(b.std(ddof=1) / a.std(ddof=1))
  f = a.var(ddof=1) / b.var(ddof=1)
  assert c["f_test_p"] == pytest.approx(2 * min(stats.f.cdf(f, 5, 5), stats.f.sf(f, 5, 5)))
  assert c["brown_forsythe_p"] == pytest.approx(stats.levene(a, b, center="median").pvalue)
  assert c["below_authors_min"] == 1
  # The outlier drives the F-test far below the robust test.
  assert c["f_test_p"] < 0.05 < c["brown_forsythe_p"]
  assert s["ours"]["final_range"] == [250.0, 301.0]
  assert s["authors"]["mean_sumr_per_epoch"] == pytest.approx([a.mean() / 2, a.mean()])


def test_spread_tests_detect_a_wider_spread_and_hold_their_level():
  rng = np.random.default_rng(7)
  a, same, wide = rng.normal(290, 8, 40), rng.normal(290, 8, 40), rng.normal(290, 24, 40)
  equal = ct.spread_tests(a, same, resamples=4000)
  wider = ct.spread_tests(a, wide, resamples=4000)
  assert equal["permutation_p"] > 0.2 and equal["sd_ratio_ci"][0] < 1 < equal["sd_ratio_ci"][1]
  assert wider["permutation_p"] < 0.001 and wider["sd_ratio_ci"][0] > 1.8
  ratio = wide.std(ddof=1) / a.std(ddof=1)
  assert wider["sd_ratio_ci"][0] < ratio < wider["sd_ratio_ci"][1]
  # Normal outcomes: the F-test's level is its nominal 5 %.
  assert 0.03 < equal["f_test_level"] < 0.08
  assert equal["shapiro_p"] == pytest.approx([stats.shapiro(a).pvalue, stats.shapiro(same).pvalue])
  assert ct.spread_tests(a, same, resamples=4000) == equal  # fixed seed: reproducible


def test_spread_tests_on_outcomes_with_a_long_low_tail():
  # One distribution for both: mostly normal, 5 % slow starts 40 below. The F-test's real level
  # on such data is far above 5 %; the permutation test does not reject here.
  rng = np.random.default_rng(3)
  draw = lambda n: rng.normal(292, 7, n) - 40 * (rng.random(n) < 0.05)
  a, b = draw(40), np.concatenate([draw(38), [248.0, 244.0]])
  s = ct.spread_tests(a, b, resamples=4000)
  f = a.var(ddof=1) / b.var(ddof=1)
  assert 2 * min(stats.f.cdf(f, 39, 39), stats.f.sf(f, 39, 39)) < 0.05  # the F-test rejects
  assert s["f_test_level"] > 0.15 and s["permutation_p"] > 0.05
  assert s["shapiro_p"][1] < 0.01


def test_results_files_are_summarised_without_training(tmp_path, capsys):
  runs = (_runs("authors", [290.0, 295.0, 300.0, 285.0])
          + _runs("ours", [288.0, 301.0, 294.0, 289.0]))
  first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  first.write_text("".join(json.dumps(r) + "\n" for r in runs[:5]))
  # A later line of the same code and seed replaces the earlier one.
  replaced = dict(runs[4], epochs=_runs("ours", [250.0])[0]["epochs"])
  second.write_text("".join(json.dumps(r) + "\n" for r in [replaced, *runs[5:]]))
  out = tmp_path / "summary"
  assert ct.main(["--out", str(out), "--epochs", "2", "--results", str(first),
                  "--results", str(second)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["seeds"] == {"authors": [0, 1, 2, 3], "ours": [0, 1, 2, 3]}
  assert summary["ours"]["final_range"] == [250.0, 301.0]
  assert (out / "outcomes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "Welch p" in capsys.readouterr().out
  second.write_text(second.read_text() + '{"code": "ours", "seed": 9}\n')
  assert ct.main(["--out", str(out), "--epochs", "2", "--results", str(second)]) == 2
  assert f"{second} line 5" in capsys.readouterr().err
  assert ct.main(["--out", str(out), "--epochs", "5", "--results", str(first)]) == 2
  assert "2 epochs, --epochs is 5" in capsys.readouterr().err


def test_committed_outcome_runs_match_the_readme():
  """tests/reference/outcome_runs.jsonl is the per-seed record behind README's outcome table."""
  rows = [json.loads(l) for l in (ct.REPO_ROOT / "tests" / "reference" / "outcome_runs.jsonl")
          .read_text().splitlines()]
  s = ct._summary(rows, ("authors", "ours"), 5)
  assert [len(s["seeds"][c]) for c in ("authors", "ours")] == [58, 58]
  assert round(s["authors"]["mean_sumr_per_epoch"][-1], 1) == 292.3
  assert round(s["ours"]["mean_sumr_per_epoch"][-1], 1) == 293.6
  c = s["comparison"]
  assert abs(c["difference_in_pooled_sd"]) <= 0.5 and c["permutation_p"] > 0.05
  assert c["f_test_p"] > 0.05 and c["brown_forsythe_p"] > 0.05
