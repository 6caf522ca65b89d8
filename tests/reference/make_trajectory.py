"""Makes tests/reference/trajectory_reference.npz: the authors' code training on a small dataset.

  MSC_PRVR_SRC=/path/to/MSC_PRVR/src python -m tests.reference.make_trajectory [--out FILE]

Runs the authors' unmodified training code (their data loader, `MSC_PRVR_Net`, loss, BertAdam and
`train_one_epoch`, imported through tests/reference/authors_code.py) on a small synthetic dataset
written in their TVR layout, and records what `tests/test_trajectory.py` replays with prvr_jax:

* the dataset itself (raw frames and caption token features, ids and texts);
* the initial weights (their `reset_parameters` from `torch.manual_seed(seed)`), the batch order
  (video indices of every step, as their shuffled DataLoader drew them), the `torch.randint`
  draws of the triplet loss (random negatives before the hard-negative epoch), and per step every
  loss part, the global gradient norm before clipping and the learning rate; the parameters after
  a few steps and at the end.
* train-mode statistics: with dropout on (0.2; once everywhere, once inside the network only), at
  fixed weights and a fixed batch (hard negatives, so the loss is random only through dropout),
  the loss parts of every draw and the per-element mean and variance of the network's outputs
  (scores, pooled queries, CBVA tokens).
* initialisation statistics: per-tensor mean and std of a fresh TVR-sized model.

The run: 44 train videos, batch 8 (6 steps per epoch, the last with 4 videos), 10 epochs = 60
steps, dropout 0 in train mode, 10 % warm-up then linear decay, hard negatives from epoch 5 with
pool size 1 (deterministic), 1-4 captions per video of 4-9 tokens, hidden size 32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import sys
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
import torch

from prvr_jax.data import synthetic
from prvr_jax.data.export_layout import export_synthetic
from tests.reference import authors_code

OUT = pathlib.Path(__file__).with_name("trajectory_reference.npz")
SEED = 2024
SPEC = dict(seed=7, num_train_videos=44, num_val_videos=8, num_test_videos=0, num_objects=6,
            num_actions=3, num_attributes=4, latent_dim=16, visual_dim=24, text_dim=20,
            min_events=1, max_events=4, min_frames=40, max_frames=220)
RUN = dict(batchsize=8, n_epoch=10, lr=5e-4, lr_warmup_proportion=0.1, wd=0.01, margin=0.1,
           hard_negative_start_epoch=5, hard_pool_size=1, sft_factor=0.09, sim_thr=0.8,
           rkd_d_coef=15.0, rkd_a_coef=30.0, vl_coef=0.1, loss_factor=[0.05, 0.04, 8e-5, 0.09],
           hidden_size=32, n_heads=4, visual_feat_dim=24, q_feat_size=20, input_drop=0.0, drop=0.0,
           initializer_range=0.02, max_desc_l=77, max_ctx_l=128, map_size=128, seed=SEED)
SNAPSHOT_STEPS = (30, 60)  # parameters after this many updates
DROPOUT = 0.2
DROPOUT_DRAWS = 400
# Dropout settings of the train-mode statistics: (input_drop, drop) per key prefix. Input dropout
# on the features dominates the spread of every output, so a second setting turns it off and
# leaves only the dropouts inside the network (attention probabilities, FFN and projection
# outputs), which would otherwise hide in its noise.
DROPOUT_SETTINGS = {"dropout": (DROPOUT, DROPOUT), "dropout_internal": (0.0, DROPOUT)}
# Outputs of their forward pass (positions in the list it returns) whose per-element mean and
# variance over the dropout draws are recorded.
DROPOUT_OUTPUTS = {"clip_scale_scores": 0, "frame_scale_scores": 3, "video_query": 5,
                   "encoded_clip_feat": 7, "encoded_frame_feat": 8}
LOSS_KEYS = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "vidlvlctl", "txt_rkd",
             "loss_overall", "clip_num")


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


class _Recorder:
  """Per-step records of the authors' training, filled by the wrappers below."""

  def __init__(self):
    self.batch_videos: list[list[int]] = []
    self.draws: list[list[tuple[int, int, np.ndarray]]] = []
    self.losses: list[dict[str, float]] = []
    self.grad_norm: list[float] = []
    self.lr: list[float] = []
    self.snapshots: dict[int, dict[str, np.ndarray]] = {}
    self._current: list[tuple[int, int, np.ndarray]] | None = None

  @contextlib.contextmanager
  def recording_draws(self) -> Iterator[None]:
    real = torch.randint

    def randint(low, high, size, *args, **kwargs):
      out = real(low, high, size, *args, **kwargs)
      self._current.append((int(low), int(high), out.numpy().copy()))
      return out

    self._current = []
    torch.randint = randint
    try:
      yield
    finally:
      torch.randint = real
      self.draws.append(self._current)
      self._current = None


def _wrap_collate(authors, recorder: _Recorder) -> None:
  real = authors.datasets.collate_train

  def collate(data):
    out = real(data)  # sorts `data` in place (by frame count: all 128, a stable no-op)
    recorder.batch_videos.append([int(item[3]) for item in data])
    return out

  authors.datasets.collate_train = collate


def _wrap_criterion(criterion, recorder: _Recorder) -> None:
  real = criterion.forward

  def forward(input_list, batch):
    with recorder.recording_draws():
      loss, parts = real(input_list, batch)
    recorder.losses.append({k: float(parts[k]) for k in LOSS_KEYS})
    return loss, parts

  criterion.forward = forward


def _wrap_optimizer(optimizer, model: torch.nn.Module, recorder: _Recorder) -> None:
  real = optimizer.step

  def step(closure=None):
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    recorder.grad_norm.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    group = optimizer.param_groups[0]
    done = len(recorder.lr)  # updates so far = the step count BertAdam's schedule reads
    recorder.lr.append(float(group["lr"] * group["schedule"].get_lr(done)))
    out = real(closure)
    if len(recorder.lr) in SNAPSHOT_STEPS:
      recorder.snapshots[len(recorder.lr)] = _state(model)
    return out

  optimizer.step = step


def _train(authors, cfg: dict[str, Any], recorder: _Recorder) -> tuple[dict, dict, Any]:
  """The authors' main() up to the epoch loop, then train_one_epoch per epoch (no validation)."""
  authors.utils.set_seed(cfg["seed"])
  _wrap_collate(authors, recorder)
  cfg, train_loader, _, _ = authors.datasets.get_datasets(cfg)
  model = authors.models.get_models(cfg)
  initial = _state(model)
  criterion = authors.losses.get_losses(cfg)
  optimizer = authors.opts.get_opts(cfg, model, train_loader)
  _wrap_criterion(criterion, recorder)
  _wrap_optimizer(optimizer, model, recorder)
  logger = logging.getLogger("authors")
  for epoch in range(cfg["n_epoch"]):
    authors.main.train_one_epoch(epoch, train_loader, model, criterion, cfg, optimizer, logger)
  return initial, _state(model), train_loader


def _dropout_statistics(authors, cfg: dict[str, Any], weights: dict[str, np.ndarray], batch,
                        prefix: str, input_drop: float, drop: float) -> dict[str, np.ndarray]:
  """Train mode with dropout at fixed weights and a fixed batch: over DROPOUT_DRAWS draws, the
  loss parts of every draw and the per-element mean and variance of the network's outputs, as
  `{prefix}/losses`, `{prefix}/{output}/mean` and `{prefix}/{output}/var`."""
  cfg = dict(cfg, input_drop=input_drop, drop=drop, use_hard_negative=True)
  model = authors.models.get_models(cfg)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
  model.train()
  criterion = authors.losses.get_losses(cfg)
  torch.manual_seed(SEED + 1)
  rows = []
  sums: dict[str, np.ndarray] = {}
  with torch.no_grad():
    for _ in range(DROPOUT_DRAWS):
      outputs = model(batch)
      _, parts = criterion(outputs, batch)
      rows.append([float(parts[k]) for k in LOSS_KEYS])
      for name, index in DROPOUT_OUTPUTS.items():
        x = outputs[index].double().numpy()
        sums[name] = sums.get(name, 0.0) + np.stack([x, x * x])
  out = {f"{prefix}/losses": np.asarray(rows)}
  for name, (s1, s2) in sums.items():
    mean = s1 / DROPOUT_DRAWS
    out[f"{prefix}/{name}/mean"] = mean
    out[f"{prefix}/{name}/var"] = (s2 - DROPOUT_DRAWS * mean * mean) / (DROPOUT_DRAWS - 1)
  return out


def _init_statistics(authors, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
  """Per-tensor (mean, std, size) of a fresh TVR-sized model (hidden 384, 768-d inputs)."""
  big = dict(cfg, hidden_size=384, visual_feat_dim=768, q_feat_size=768)
  torch.manual_seed(SEED + 2)
  state = _state(authors.models.get_models(big))
  names = sorted(state)
  stats = np.array([[state[n].mean(dtype=np.float64), state[n].std(dtype=np.float64), state[n].size]
                    for n in names])
  return dict(names=np.array(names), stats=stats)


def _pack(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated rows and (n+1,) offsets."""
  offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
  return np.concatenate(rows, axis=0), offsets


def _dataset_arrays(spec: synthetic.SyntheticSpec) -> dict[str, np.ndarray]:
  world = synthetic.make_world(spec)
  out: dict[str, np.ndarray] = {}
  for split in ("train", "val"):
    records = list(synthetic.generate_split(spec, split, world))
    frames, frame_offsets = _pack([r.frames for r in records])
    tokens, token_offsets = _pack([t for r in records for t in r.caption_tokens])
    out.update({
        f"data/{split}/video_ids": np.array([r.video_id for r in records]),
        f"data/{split}/frames": frames, f"data/{split}/frame_offsets": frame_offsets,
        f"data/{split}/caption_ids": np.array([c for r in records for c in r.caption_ids]),
        f"data/{split}/caption_texts": np.array([t for r in records for t in r.caption_texts]),
        f"data/{split}/caption_tokens": tokens, f"data/{split}/caption_offsets": token_offsets,
    })
  return out


def _draw_arrays(draws: list[list[tuple[int, int, np.ndarray]]]) -> dict[str, np.ndarray]:
  """Every torch.randint call of every step: (low, high, count) per call, values concatenated."""
  calls, values, per_step = [], [], []
  for step in draws:
    per_step.append(len(step))
    for low, high, v in step:
      calls.append((low, high, v.size))
      values.append(v.reshape(-1))
  return {"draws/calls": np.asarray(calls, np.int64).reshape(-1, 3),
          "draws/values": np.concatenate(values).astype(np.int64),
          "draws/calls_per_step": np.asarray(per_step, np.int64)}


def make(src: pathlib.Path, out: pathlib.Path) -> None:
  """Runs everything and writes `out`."""
  authors = authors_code.load(src)
  torch.set_num_threads(1)
  spec = synthetic.SyntheticSpec(**SPEC)
  with tempfile.TemporaryDirectory() as tmp:
    export_synthetic(tmp, "tvr", spec)
    cfg = authors_code.tvr_config(authors, tmp, **RUN)
    recorder = _Recorder()
    initial, final, train_loader = _train(authors, cfg, recorder)
    batch = next(iter(train_loader))
    dropout = {}
    for prefix, (input_drop, drop) in DROPOUT_SETTINGS.items():
      dropout.update(_dropout_statistics(authors, cfg, final, batch, prefix, input_drop, drop))
    init_stats = _init_statistics(authors, cfg)
  steps = len(recorder.lr)
  batch = RUN["batchsize"]
  order = np.full((steps, batch), -1, np.int64)
  for s, videos in enumerate(recorder.batch_videos[:steps]):
    order[s, :len(videos)] = videos
  arrays: dict[str, np.ndarray] = {
      "config/json": np.array(json.dumps(dict(spec=SPEC, run=RUN, snapshot_steps=SNAPSHOT_STEPS,
                                              dropout=DROPOUT, dropout_settings=DROPOUT_SETTINGS,
                                              loss_keys=LOSS_KEYS,
                                              torch=torch.__version__))),
      "steps/batch_videos": order,
      "steps/losses": np.array([[d[k] for k in LOSS_KEYS] for d in recorder.losses]),
      "steps/grad_norm": np.array(recorder.grad_norm),
      "steps/lr": np.array(recorder.lr),
      **dropout,
      # The batch of the dropout statistics: the next one the loader drew after training.
      "dropout/batch_videos": np.asarray(recorder.batch_videos[steps], np.int64),
      "init/names": init_stats["names"], "init/stats": init_stats["stats"],
      **_dataset_arrays(spec), **_draw_arrays(recorder.draws),
  }
  arrays.update({f"param/initial/{k}": v for k, v in initial.items()})
  for step, state in recorder.snapshots.items():
    arrays.update({f"param/step{step}/{k}": v for k, v in state.items()})
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  print(f"wrote {out}: {steps} steps, final loss {recorder.losses[-1]['loss_overall']:.6f}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args(argv)
  src = authors_code.source_dir()
  if src is None:
    print(f"error: set {authors_code.ENV_VAR} to the authors' MSC_PRVR/src folder", file=sys.stderr)
    return 2
  make(src, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
