"""The outcome comparison's statistics (tests/reference/compare_training.py), on made-up runs."""

from __future__ import annotations

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
