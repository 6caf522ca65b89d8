"""Optimisers: the reference's BertAdam as an Optax chain, and AdamW.

BertAdam (the reference's optimiser): per-tensor gradient-norm clipping, Adam moments with NO bias
correction, decoupled weight decay, and a linear warm-up / linear decay learning rate evaluated at
the step count *before* the update (so the very first update has learning rate 0, as in the
reference).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from prvr_jax.errors import ConfigError
from prvr_jax.models.caption_tower import CaptionTowerConfig, trainable_labels


def clip_by_per_tensor_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales each leaf to norm <= max_norm on its own (torch `clip_grad_norm_(p)` per parameter)."""

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g)))
      return g * jnp.minimum(1.0, max_norm / (norm + 1e-6))

    return jax.tree_util.tree_map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class BertAdamState(NamedTuple):
  mu: Any
  nu: Any


def scale_by_adam_without_bias_correction(b1: float = 0.9, b2: float = 0.999,
                                          eps: float = 1e-6) -> optax.GradientTransformation:
  """m / (sqrt(v) + eps) with raw exponential moving averages (no bias correction)."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p)
    return BertAdamState(jax.tree_util.tree_map(zeros, params), jax.tree_util.tree_map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
    out = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, BertAdamState(mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def warmup_linear_schedule(peak_lr: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
  """lr * (p / w if p < w else max((p - 1) / (w - 1), 0)), p = step / total_steps (reference).

  The reference evaluates this in float64. In float32, 1 - p loses its digits as p nears 1 (the
  last steps' rates were 4e-6 off), so the decay is computed as (total - step) / (total (1 - w))
  (an exact integer difference), and which steps warm up is decided in float64 here, once.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  warmup_fraction = max(float(warmup_fraction), 0.0)
  # First step whose progress step / total_steps is not below the warm-up fraction (float64).
  warmup_end = next(s for s in range(total_steps + 1) if s / total_steps >= warmup_fraction)
  warm_rate = peak_lr / (total_steps * warmup_fraction) if warmup_end > 0 else 0.0
  decay_rate = peak_lr / (total_steps * (1.0 - warmup_fraction))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.maximum(total_steps - step, 0.0) * decay_rate
    return jnp.where(step < warmup_end, step * warm_rate, decay)

  return schedule


def is_decayed(path: tuple[Any, ...]) -> bool:
  """Whether the parameter at `path` (a pytree key path) gets weight decay: every one but biases
  and LayerNorm parameters.

  The reference exempts torch names containing 'bias' or 'LayerNorm'; our LayerNorms are the
  `*layer_norm*` modules (MSC's `layer_norm`, CLIP's `layer_norm1/2` and `final_layer_norm`), so
  one rule by our names covers the network and an in-model CLIP text tower alike. The
  transformer layers' post-attention norms are named `norm1`/`norm2` (there as here): they are
  decayed, as in the reference.
  """
  names = [getattr(k, "key", str(k)) for k in path]
  return names[-1] != "bias" and not any("layer_norm" in n for n in names)


def reference_decay_mask(params: Any) -> Any:
  """A params-shaped tree: True where weight decay applies (`is_decayed`)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(path), params)


def bert_adam(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-6, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
              decay_mask: Any | Callable[[Any], Any] = reference_decay_mask) -> optax.GradientTransformation:
  """The reference BertAdam as an Optax chain."""
  parts = []
  if max_grad_norm > 0:
    parts.append(clip_by_per_tensor_norm(max_grad_norm))
  parts.append(scale_by_adam_without_bias_correction(b1, b2, eps))
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.01,
          max_grad_norm: float = 1.0, decay_mask: Any | Callable[[Any], Any] = reference_decay_mask
          ) -> optax.GradientTransformation:
  """AdamW (bias-corrected) with global-norm clipping, the common alternative."""
  return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                     optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask))


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule,
                   caption_tower: CaptionTowerConfig | None = None, **kwargs) -> optax.GradientTransformation:
  """'bert_adam' (reference) or 'adamw'.

  With an in-model CLIP text tower, its frozen parameters get zero updates (no moments, no weight
  decay) through `optax.multi_transform`; the trainable top blocks, if any, are optimised like
  the rest of the model.
  """
  if name == "bert_adam":
    optimizer = bert_adam(learning_rate, **kwargs)
  elif name == "adamw":
    optimizer = adamw(learning_rate, **kwargs)
  else:
    raise ConfigError(f"unknown optimizer {name!r}; expected 'bert_adam' or 'adamw'")
  if caption_tower is None:
    return optimizer
  return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()},
                               lambda params: trainable_labels(params, caption_tower))
