"""Shared pieces of the benchmark configs: model, loss, optimiser, training and eval sections.

Every key means one thing; `get_config()` of each benchmark file starts from `base_config()` and
overrides the reference's per-dataset values.
"""

from __future__ import annotations

import ml_collections


def model_section(visual_input_size: int = 768, query_input_size: int = 768, dropout: float = 0.2,
                  sft_factor: float = 0.09) -> ml_collections.ConfigDict:
  """`config.model`: the fields of `prvr_jax.models.config.ModelConfig`."""
  return ml_collections.ConfigDict(dict(
      hidden_size=384, num_heads=4, visual_input_size=visual_input_size,
      query_input_size=query_input_size, max_desc_len=77, max_ctx_len=128, num_clips=32,
      num_frames=128, sft_factor=sft_factor, input_dropout=dropout, dropout=dropout,
      initializer_range=0.02, gauss_widths=(0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0), use_op_tome=True))


def loss_section(margin: float = 0.1, clip_nce_weight: float = 0.05, frame_nce_weight: float = 0.04,
                 sim_thr: float = 0.8) -> ml_collections.ConfigDict:
  """`config.loss`: the fields of `prvr_jax.losses.config.LossConfig` (TVR values by default)."""
  return ml_collections.ConfigDict(dict(
      margin=margin, clip_nce_weight=clip_nce_weight, frame_nce_weight=frame_nce_weight,
      hard_pool_size=20, use_tcpl=True, tcpl_distance_weight=15.0, tcpl_angle_weight=30.0,
      tcpl_tile_size=64, tcpl_scope="global", use_cbva=True, cbva_weight=0.1, adaptive_cbva=True, cbva_fixed_clips=32,
      sim_thr=sim_thr))


def optim_section(lr: float = 3e-4) -> ml_collections.ConfigDict:
  """`config.optim`: BertAdam (reference) or AdamW, warm-up then linear decay."""
  return ml_collections.ConfigDict(dict(
      name="bert_adam", lr=lr, warmup_fraction=0.01, weight_decay=0.01, max_grad_norm=1.0))


def train_section(num_epochs: int = 100) -> ml_collections.ConfigDict:
  """`config.train`: the loop (reference schedule: 100 epochs, hard negatives from epoch 20, early
  stop after 10 evaluations without a better val SumR).

  Keys:
    num_epochs: length of the run and of the learning-rate schedule.
    max_steps: stop after this many steps (0 = run all epochs); the schedule still follows
      num_epochs, so a short run is the start of the long one.
    hard_negative_start_epoch: triplet negatives from the hardest pool from this epoch on.
    early_stop_patience: stop after this many evaluations without a better val SumR (0 = never).
    log_every: steps between lines of metrics.jsonl / TensorBoard.
    checkpoint_every: steps between checkpoints (0 = at every evaluation only); a checkpoint is
      also written at every evaluation, at the end and on SIGTERM.
    keep_checkpoints: latest checkpoints kept (the best by val SumR is kept besides).
  """
  return ml_collections.ConfigDict(dict(
      num_epochs=num_epochs, max_steps=0, hard_negative_start_epoch=20, early_stop_patience=10,
      log_every=50, checkpoint_every=0, keep_checkpoints=2))


def text_tower_section() -> ml_collections.ConfigDict:
  """`config.text_tower`: where the query encoder's caption token features come from.

  Keys:
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
  """
  return ml_collections.ConfigDict(dict(clip_dir="", features="projected", trainable_blocks=0))


def eval_section() -> ml_collections.ConfigDict:
  """`config.eval`.

  Keys:
    every: steps between validation runs (0 = at the end of every epoch).
    clip_weight, frame_weight: fusion of the clip- and frame-scale scores (0.4 / 0.6).
    final_splits: splits evaluated with the best checkpoint when training ends, and by
      --mode=eval (a split the dataset lacks is skipped with a message).
    diagnostics: also compute the semantic-collapse diagnostics (and their plot) at the end.
    diagnostics_max_queries: queries used by the diagnostics.
  """
  return ml_collections.ConfigDict(dict(
      every=0, clip_weight=0.4, frame_weight=0.6, final_splits=("val", "test"), diagnostics=True,
      diagnostics_max_queries=2000))


def benchmark_config(name: str, *, visual_input_size: int = 768, query_input_size: int = 768,
                     dropout: float, sft_factor: float, margin: float, clip_nce_weight: float,
                     frame_nce_weight: float, sim_thr: float, lr: float,
                     visual_feature: str = "clip") -> ml_collections.ConfigDict:
  """A real benchmark's run config from the values the reference sets per dataset."""
  from configs.data_defaults import data_section  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict()
  config.seed = 9527
  config.data = data_section(name, visual_feature=visual_feature)
  config.model = model_section(visual_input_size=visual_input_size, query_input_size=query_input_size,
                               dropout=dropout, sft_factor=sft_factor)
  config.loss = loss_section(margin=margin, clip_nce_weight=clip_nce_weight,
                             frame_nce_weight=frame_nce_weight, sim_thr=sim_thr)
  config.optim = optim_section(lr=lr)
  config.train = train_section()
  config.eval = eval_section()
  config.text_tower = text_tower_section()
  return config
