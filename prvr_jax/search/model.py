"""The trained network a search runs, restored from a training workdir, and its identity.

An index records the identity of the model that encoded its videos (workdir, checkpoint step,
config hash, a hash of the parameters, feature widths); queries must be encoded by the same
model, so `query` restores that exact step and refuses parameters whose hash differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from prvr_jax.models.config import ModelConfig
from prvr_jax.run import Run, load_trained
from prvr_jax.search.errors import SearchError
from prvr_jax.text.tokenizer import CLIP_CONTEXT_LENGTH
from prvr_jax.train.checkpoint import MissingStepError

WHICH = ("best", "latest")


def config_hash(model_cfg: ModelConfig) -> str:
  """sha256 of the network's hyper-parameters (canonical JSON of the ModelConfig)."""
  text = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()


def params_hash(params: Any) -> str:
  """sha256 over every parameter's path, shape and float32 bytes (a checkpoint's fingerprint)."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
    digest.update(f"{jax.tree_util.keystr(path)}{arr.shape}".encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class SearchModel:
  """A network and the settings a search needs from its run.

  Attributes:
    model_cfg: the network's hyper-parameters.
    params: its parameters (the `params` collection), on this process's first device.
    clip_weight, frame_weight: score fusion (the run's config.eval).
    max_query_tokens: rows a query keeps (the loader's caption length, at most the model's).
    truncate_keep_eos: the loader's truncation rule (config.data.truncate_keep_eos).
    identity: JSON-able {workdir, which, step, config_hash, params_hash, visual_input_size,
      query_input_size, hidden_size}, stored in an index's manifest.
  """

  model_cfg: ModelConfig
  params: Any
  clip_weight: float
  frame_weight: float
  max_query_tokens: int
  truncate_keep_eos: bool
  identity: dict[str, Any]

  @property
  def name(self) -> str:
    """Words naming the model in messages."""
    i = self.identity
    return f"{i['workdir'] or '(in memory)'} step {i['step']}"


def from_params(model_cfg: ModelConfig, params: Any, *, clip_weight: float = 0.4,
                frame_weight: float = 0.6, max_caption_tokens: int = 0,
                truncate_keep_eos: bool = False, workdir: str = "", which: str = "",
                step: int = -1) -> SearchModel:
  """A SearchModel from parameters in memory (tests, notebooks) or a restored run.

  Args:
    model_cfg: the network's config.
    params: its `params` collection (e.g. `init_params(model_cfg, key)`).
    clip_weight, frame_weight: score fusion.
    max_caption_tokens: the run's config.data.max_caption_tokens (0 = up to 77).
    truncate_keep_eos: the run's config.data.truncate_keep_eos.
    workdir, which, step: where the parameters came from ('' / -1 when not from a run).

  Returns:
    The SearchModel.
  """
  limit = int(max_caption_tokens) if max_caption_tokens > 0 else CLIP_CONTEXT_LENGTH
  # Search runs on one device: a restored run's parameters are replicated over its whole mesh.
  params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
  identity = dict(workdir=workdir, which=which, step=int(step), config_hash=config_hash(model_cfg),
                  params_hash=params_hash(params), visual_input_size=model_cfg.visual_input_size,
                  query_input_size=model_cfg.query_input_size, hidden_size=model_cfg.hidden_size)
  return SearchModel(model_cfg, params, float(clip_weight), float(frame_weight),
                     min(limit, model_cfg.max_desc_len), bool(truncate_keep_eos), identity)


def _restore_step(workdir: str, step: int) -> tuple[Run, Any]:
  """(run, params) of one given checkpoint step of a run (no dataset needed)."""
  try:
    run, params, _ = load_trained(workdir, step=step)
  except MissingStepError as e:
    raise SearchError(f"{e}; rebuild the index with this run") from None
  return run, params


def load_search_model(workdir: str | os.PathLike, which: str = "best",
                      step: Optional[int] = None) -> SearchModel:
  """Restores a trained run for searching.

  Args:
    workdir: the training workdir (holds config.json and checkpoints/).
    which: 'best' (best val SumR, else the latest) or 'latest'; ignored when `step` is given.
    step: restore exactly this checkpoint step (what `query` does with an index's step).

  Returns:
    The SearchModel with the run's fusion weights and caption settings.

  Raises:
    SearchError: unknown `which`, or `step` no longer kept.
    prvr_jax.train.checkpoint.CheckpointError: no run / no checkpoint / corrupt checkpoint there.
  """
  if which not in WHICH:
    raise SearchError(f"--which must be one of {WHICH}, got {which!r}")
  workdir = os.path.abspath(os.fspath(workdir))
  if step is None:
    run, params, step = load_trained(workdir, which)
  else:
    run, params = _restore_step(workdir, int(step))
  return from_params(run.model, params, clip_weight=run.eval.clip_weight,
                     frame_weight=run.eval.frame_weight,
                     max_caption_tokens=run.data.max_caption_tokens,
                     truncate_keep_eos=run.data.truncate_keep_eos,
                     workdir=workdir, which=which, step=int(step))
