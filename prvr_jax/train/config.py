"""`config.train`, `config.optim` and `config.text_tower` as frozen dataclasses."""

from __future__ import annotations

import dataclasses

from prvr_jax.errors import ConfigError
from prvr_jax.models.caption_tower import FEATURES as TEXT_TOWER_FEATURES
from prvr_jax.models.layers import REMAT_POLICIES
from prvr_jax.utils.dtypes import COMPUTE_DTYPES
from prvr_jax.utils.config import Section

OPTIMIZERS = ("bert_adam", "adamw")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """The loop (reference schedule: 100 epochs, hard negatives from epoch 20, early stop after 10
  evaluations without a better val SumR).

  Attributes:
    num_epochs: length of the run and of the learning-rate schedule.
    max_steps: stop after this many steps (0 = run all epochs); the schedule still follows
      num_epochs, so a short run is the start of the long one.
    hard_negative_start_epoch: triplet negatives from the hardest pool from this epoch on.
    early_stop_patience: stop after this many evaluations without a better val SumR (0 = never).
    log_every: steps between lines of metrics.jsonl / TensorBoard.
    checkpoint_every: steps between checkpoints (0 = at every evaluation only); a checkpoint is
      also written at every evaluation, at the end and on SIGTERM.
    keep_checkpoints: latest checkpoints kept (the best by val SumR is kept besides).
    remat: 'none' or 'blocks': every attention block / DyGMM branch is recomputed in the
      backward pass instead of keeping its activations (less memory, about one more forward
      pass of time; same losses and gradients). See models/layers.py `REMAT_POLICIES`.
  """

  SECTION = "train"

  num_epochs: int = 100
  max_steps: int = 0
  hard_negative_start_epoch: int = 20
  early_stop_patience: int = 10
  log_every: int = 50
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  remat: str = "none"

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"train.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    for key in ("num_epochs", "log_every"):
      if getattr(self, key) < 1:
        raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
    for key in ("max_steps", "early_stop_patience", "checkpoint_every"):
      if getattr(self, key) < 0:
        raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")



@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
  """BertAdam (the reference) or AdamW, warm-up then linear decay (see train/optim.py).

  Attributes:
    name: one of OPTIMIZERS.
    lr: peak learning rate.
    warmup_fraction: fraction of the steps of the linear warm-up.
    weight_decay: decoupled weight decay (biases and LayerNorm parameters are exempt).
    max_grad_norm: gradient clipping (per tensor for BertAdam, global for AdamW; 0 = none).
  """

  SECTION = "optim"

  name: str = "bert_adam"
  lr: float = 3e-4
  warmup_fraction: float = 0.01
  weight_decay: float = 0.01
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ConfigError(f"unknown optimizer {self.name!r}; expected 'bert_adam' or 'adamw'")



@dataclasses.dataclass(frozen=True)
class TextTowerConfig(Section):
  """Where the query encoder's caption token features come from.

  Attributes:
    clip_dir: '' = the caption token features of the dataset's text feature file (the authors'
      setup). A local Hugging Face CLIP checkpoint directory (config.json + model.safetensors) =
      the model runs that checkpoint's text tower itself on the caption text (tokenised in the
      loader with the vendored CLIP BPE), initialised from the checkpoint; the run keeps the
      tower's shape in <workdir>/caption_tower.json, so resuming, evaluating and searching do
      not need the directory again.
    features: the tower rows fed to the query encoder: 'projected' (final-LayerNorm states through
      text_projection, what `python -m prvr_jax.extract captions` writes by default) or 'hidden'.
    trainable_blocks: 0 = frozen tower (the same inputs as features extracted with it); N > 0 =
      its last N blocks, final LayerNorm and projection are trained. TCPL's teacher always is the
      frozen checkpoint's EOS embedding.
    dtype: the tower's compute dtype, 'float32' or 'bfloat16' (float32 parameters either way;
      independent of `model.dtype`). A resumed run may change it.
  """

  SECTION = "text_tower"  # absent from runs made before it existed: the defaults

  clip_dir: str = ""
  features: str = "projected"
  trainable_blocks: int = 0
  dtype: str = "float32"

  def __post_init__(self):
    if self.features not in TEXT_TOWER_FEATURES:
      raise ConfigError(f"text_tower.features must be one of {TEXT_TOWER_FEATURES}, got "
                        f"{self.features!r}")
    if self.trainable_blocks < 0:
      raise ConfigError(f"text_tower.trainable_blocks must be >= 0, got {self.trainable_blocks}")
    if self.dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"text_tower.dtype must be one of {list(COMPUTE_DTYPES)}, got "
                        f"{self.dtype!r}")

