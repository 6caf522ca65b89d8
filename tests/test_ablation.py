"""The ablation runner's variants and table (the runs themselves are what test_train_loop covers)."""

from __future__ import annotations

from configs import synthetic
from prvr_jax import ablation
from prvr_jax.losses.config import LossConfig
from prvr_jax.models.config import ModelConfig


def test_variants_are_cumulative_and_end_at_msc():
  base = synthetic.get_config()
  got = {}
  for name in ablation.VARIANTS:
    c = ablation.variant_config(base, name, seed=7, epochs=3, data_dir="/tmp/shared")
    loss, model = LossConfig.from_config_dict(c.loss), ModelConfig.from_config_dict(c.model)
    got[name] = (loss.use_tcpl, loss.use_cbva, model.use_op_tome, loss.adaptive_cbva)
    assert (c.seed, c.train.num_epochs, c.data.data_dir) == (7, 3, "/tmp/shared")
  assert got["baseline"] == (False, False, False, False)
  assert got["+adaptive (MSC)"] == (True, True, True, True)
  on = [sum(v) for v in got.values()]
  assert on == sorted(on) and on == [0, 1, 2, 3, 4]
  assert base.seed == 0 and base.loss.use_tcpl  # the base config is not modified


def test_table_reports_mean_and_std():
  runs = {"baseline": [dict(zip(ablation.METRICS, (10, 20, 30, 100, 160))),
                       dict(zip(ablation.METRICS, (20, 30, 40, 100, 190)))]}
  text = ablation.table(runs, "test")
  assert "| baseline | 15.0 ± 5.0 | 25.0 ± 5.0 | 35.0 ± 5.0 | 100.0 ± 0.0 | 175.0 ± 15.0 |" in text
