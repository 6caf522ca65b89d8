"""The golden file's batch through the network in float32 and in another compute dtype.

Where `golden_parity` compares float32 against the authors' numbers, this compares a compute
dtype (bfloat16) against our float32 on the same inputs and parameters: every loss term's relative
difference, and whether every discrete output (the batch's OP-ToMe merge labels and sizes, CBVA's
clip counts, per-level and final segment labels) is exactly equal.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from prvr_jax.convert.golden_parity import (GoldenChecks, check_inputs, load_golden,
                                            model_from_golden)
from prvr_jax.losses.total import cbva_terms, msc_loss
from prvr_jax.models.msc import MSCNet

# The discrete outputs of the loss stage (CBVA) compared for exact equality.
DISCRETE_TERMS = ("clip_count", "labels_per_level", "labels", "sizes")
# Loss terms that are counts, not losses (compared exactly with the discrete outputs).
COUNT_PARTS = ("clip_count",)


def _losses_and_discrete(model: MSCNet, params: Any, batch: dict[str, jax.Array], loss_cfg: Any,
                         deterministic_triplet: bool) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """({loss term: value}, {discrete output: array}) of one forward pass (eval mode)."""

  @jax.jit
  def run(p, b):
    out = model.apply({"params": p}, b, deterministic=True)
    total, parts = msc_loss(out, b, loss_cfg, jax.random.key(0), deterministic_triplet)
    return dict(parts, total=total), cbva_terms(out, b, loss_cfg)

  parts, terms = run(params, batch)
  losses = {k: float(v) for k, v in parts.items() if k not in COUNT_PARTS}
  discrete = {f"cbva/{k}": np.asarray(terms[k]) for k in DISCRETE_TERMS}
  discrete.update({f"loss/{k}": np.asarray(parts[k]) for k in COUNT_PARTS})
  for k in ("merge_size", "merged_frame_label"):
    discrete[f"batch/{k}"] = np.asarray(batch[k])
  return losses, discrete


def compare_dtypes(path: str | pathlib.Path, dtype: str = "bfloat16") -> dict[str, Any]:
  """Runs the golden file's batch in float32 and in `dtype` (same params, eval mode).

  Args:
    path: a golden .npz (shared/golden/README.md format).
    dtype: the compute dtype compared with float32 (a `config.model.dtype` value).

  Returns:
    dict with `losses` {term: (float32 value, dtype value, relative difference)},
    `worst_loss` (the term with the largest relative difference) and `worst_rel`, and
    `discrete` {output: True when exactly equal}, `discrete_equal` (all of them).
  """
  g = load_golden(path)
  meta, model_cfg, params, loss_cfg = model_from_golden(g, path)
  length = int(meta.get("map_size", model_cfg.num_frames))
  batch = check_inputs(g, GoldenChecks({}), length)
  triplet = bool(meta.get("use_hard_negative", False)) and loss_cfg.hard_pool_size == 1
  ref_losses, ref_discrete = _losses_and_discrete(MSCNet(model_cfg), params, batch, loss_cfg, triplet)
  other = MSCNet(dataclasses.replace(model_cfg, dtype=dtype))
  losses, discrete = _losses_and_discrete(other, params, batch, loss_cfg, triplet)
  rel = {k: abs(losses[k] - v) / max(abs(v), 1e-12) for k, v in ref_losses.items()}
  worst = max(rel, key=rel.get)
  same = {k: bool(np.array_equal(v, discrete[k])) for k, v in ref_discrete.items()}
  return dict(dtype=dtype, losses={k: (ref_losses[k], losses[k], rel[k]) for k in ref_losses},
              worst_loss=worst, worst_rel=rel[worst], discrete=same, discrete_equal=all(same.values()))
