"""Runs our whole pipeline on a golden file of the authors' implementation and compares every key.

raw inputs -> preprocessing -> OP-ToMe -> network -> losses (+ gradients) -> eval scores and R@k.
Works on any file of the format documented in shared/golden/README.md (any batch size, caption
count, feature or hidden size): every shape and hyper-parameter comes from the file itself.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from prvr_jax.convert.state_dict import ConversionError, convert, golden_state_dict, params_to_torch_names
from prvr_jax.data import preprocess
from prvr_jax.errors import PrvrError
from prvr_jax.eval.metrics import gt_ranks, recall_at_k
from prvr_jax.losses.config import LossConfig
from prvr_jax.losses.total import cbva_terms, msc_loss
from prvr_jax.models.msc import MSCNet, last_token_features
from prvr_jax.ops import tome
from prvr_jax.ops.similarity import fused_scores, l2_normalize, max_token_scores
from prvr_jax.ops.video_inputs import OP_TOME_TARGETS, data_l2_normalize

# (atol, rtol) per kind of key; 'exact' keys are integers or integer-valued and must be equal.
TOLERANCES: dict[str, tuple[float, float]] = {
    "features": (1e-4, 1e-4),
    "loss": (1e-6, 1e-5),
    "grad": (1e-5, 1e-3),
    "ratio": (1e-6, 0.0),
    "exact": (0.0, 0.0),
}
MAX_CAPTION_TOKENS = 77
REQUIRED_KEYS = ("config/json", "input/frames", "input/frame_offsets", "input/caps",
                 "input/cap_offsets", "input/cap_video")


@dataclasses.dataclass
class Row:
  """One compared key."""

  key: str
  kind: str
  max_abs: float = float("nan")
  max_rel: float = float("nan")
  ok: Optional[bool] = None  # None: not compared (see note)
  note: str = ""

  @property
  def tolerance(self) -> tuple[float, float]:
    return TOLERANCES.get(self.kind, (float("nan"), float("nan")))


class ParityError(PrvrError, ValueError):
  """A golden file that is not of the documented format; the message names the file and key."""


def _compare(key: str, kind: str, ours: Any, ref: np.ndarray) -> Row:
  ours = np.asarray(ours)
  ref = np.asarray(ref)
  if ours.shape != ref.shape:
    return Row(key, kind, ok=False, note=f"shape {ours.shape} != golden {ref.shape}")
  if ref.size == 0:
    return Row(key, kind, 0.0, 0.0, True)
  diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
  max_abs = float(diff.max())
  max_rel = float((diff / np.maximum(np.abs(ref.astype(np.float64)), 1e-12)).max())
  atol, rtol = TOLERANCES[kind]
  ok = bool(np.all(diff <= atol + rtol * np.abs(ref.astype(np.float64))))
  return Row(key, kind, max_abs, max_rel, ok)


def _split(values: np.ndarray, offsets: np.ndarray, what: str) -> list[np.ndarray]:
  try:
    return preprocess.split_concatenated(values, offsets)
  except ValueError as e:
    raise ParityError(f"{what} offsets: {e}") from e


def _captions(caps: np.ndarray, offsets: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
  """Normalised, truncated, zero-padded caption tokens (Q, Lmax, D) and mask (Q, Lmax)."""
  return preprocess.pad_sequences([preprocess.l2_normalize(c) for c in _split(caps, offsets, what)],
                                  MAX_CAPTION_TOKENS)


def _video_batch(frames: np.ndarray, offsets: np.ndarray, length: int) -> dict[str, np.ndarray]:
  fixed = preprocess.resample_batch(_split(frames, offsets, "frame"), length)
  merged = jax.jit(tome.op_tome, static_argnums=1)(jnp.asarray(fixed), OP_TOME_TARGETS)
  return dict(fixed=fixed, merged=merged,
              clip_video_features=np.asarray(data_l2_normalize(merged.tokens)),
              frame_video_features=preprocess.l2_normalize(fixed),
              merge_size=np.asarray(merged.sizes),
              merged_frame_label=np.asarray(merged.labels),
              videos_mask=np.ones(fixed.shape[:2], np.float32))


def load_golden(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a golden .npz (no pickle), checking the keys every run needs."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ParityError(f"golden file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile / numpy raise several types for corrupt files
    raise ParityError(f"cannot read golden file {path}: {type(e).__name__}: {e}") from e
  missing = [k for k in REQUIRED_KEYS if k not in data]
  if missing:
    raise ParityError(f"{path} lacks required keys {missing}")
  return data


class GoldenChecks:
  """The rows of a parity run: each golden key compared (if the file has it) with our value.

  `check(key, kind, ours)` appends one Row when the golden file has `key` (`ours` may be a
  callable, evaluated only then); `rows` holds them in order."""

  def __init__(self, golden: Mapping[str, np.ndarray]):
    self.golden = golden
    self.rows: list[Row] = []

  def __call__(self, key: str, kind: str, ours: Callable[[], Any] | Any) -> None:
    if key not in self.golden:
      return
    value = ours() if callable(ours) else ours
    self.rows.append(_compare(key, kind, value, self.golden[key]))


def model_from_golden(g: Mapping[str, np.ndarray], path: str | pathlib.Path
           ) -> tuple[dict[str, Any], Any, Any, LossConfig]:
  """(meta dict, ModelConfig, converted params, LossConfig) of a golden file's arrays `g`; a
  missing config entry or an unconvertible state dict is a ParityError naming `path`."""
  try:
    meta = json.loads(str(g["config/json"]))
    model_cfg, params = convert(golden_state_dict(g), num_heads=int(meta["n_heads"]),
                                sft_factor=float(meta["sft_factor"]))
    factors = meta.get("loss_factor", [0.05, 0.04])
    loss_cfg = LossConfig(margin=float(meta["margin"]), clip_nce_weight=float(factors[0]),
                          frame_nce_weight=float(factors[1]),
                          hard_pool_size=int(meta.get("hard_pool_size", 1)),
                          tcpl_distance_weight=float(meta["rkd_d_coef"]),
                          tcpl_angle_weight=float(meta["rkd_a_coef"]),
                          cbva_weight=float(meta["vl_coef"]), sim_thr=float(meta["sim_thr"]))
  except KeyError as e:
    raise ParityError(f"{path}: config/json has no {e} entry") from e
  except (ConversionError, json.JSONDecodeError) as e:
    raise ParityError(f"{path}: {e}") from e
  return meta, model_cfg, params, loss_cfg


def check_inputs(g: Mapping[str, np.ndarray], check: GoldenChecks,
                 length: int) -> dict[str, jax.Array]:
  """1. Preprocessing and OP-ToMe checked through `check`; returns the model's batch (frames
  resampled to `length`, the 32 merged clip tokens, captions; jnp arrays keyed as the model's
  inputs)."""
  vb = _video_batch(g["input/frames"], g["input/frame_offsets"], length)
  check("data/fixed128", "features", vb["fixed"])
  for level, target in enumerate(OP_TOME_TARGETS):
    check(f"data/opt_size_{target}", "exact", vb["merged"].level_sizes[level])
    check(f"data/opt_label_{target}", "exact", vb["merged"].level_labels[level])
  text_feat, text_mask = _captions(g["input/caps"], g["input/cap_offsets"], "caption")
  batch = dict(clip_video_features=vb["clip_video_features"], merge_size=vb["merge_size"],
               merged_frame_label=vb["merged_frame_label"],
               frame_video_features=vb["frame_video_features"], videos_mask=vb["videos_mask"],
               text_feat=text_feat, text_mask=text_mask,
               text_labels=np.asarray(g["input/cap_video"], np.int32))
  for name in ("clip_video_features", "frame_video_features", "videos_mask", "text_feat", "text_mask"):
    check(f"batch/{name}", "features", batch[name])
  for name in ("merge_size", "merged_frame_label", "text_labels"):
    check(f"batch/{name}", "exact", batch[name])
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _check_network(check: GoldenChecks, model: MSCNet, params: Any,
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """2. The network (eval mode), with every submodule's output captured for the dbg/* keys."""
  out, state = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True,
                                                capture_intermediates=True,
                                                mutable=["intermediates"]))(params, batch)
  inter = traverse_util.flatten_dict(state["intermediates"], sep="/")
  for name in ("video_query", "encoded_query", "clip_scale_scores", "clip_scale_scores_",
               "frame_scale_scores", "frame_scale_scores_", "encoded_clip_feat", "encoded_frame_feat"):
    check(f"out/{name}", "features", out[name])
  check("out/clip_query", "features", lambda: last_token_features(batch["text_feat"], batch["text_mask"]))
  check("out/merge_size", "exact", batch["merge_size"][..., None])
  dbg = {
      "dbg/clip_input_proj": "clip_input_proj/__call__", "dbg/clip_pos_embed": "clip_pos_embed/__call__",
      "dbg/frame_pos_embed": "frame_pos_embed/__call__", "dbg/query_input_proj": "query_input_proj/__call__",
      "dbg/query_pos_embed": "query_pos_embed/__call__", "dbg/query_encoder": "query_encoder/__call__",
      "dbg/clip_encoder": "clip_encoder/__call__", "dbg/frame_encoder_1": "frame_encoder/__call__",
  }
  for key, ours in dbg.items():
    check(key, "features", lambda ours=ours: inter[ours][0])
  check("dbg/vid_proposal_feat", "features", out["clip_tokens"])
  check("dbg/clip_encoder.branch_out", "features",
        lambda: jnp.moveaxis(inter["clip_encoder/branch_out"][0], 1, 0))
  check("dbg/frame_encoder_1.branch0_out", "features", lambda: inter["frame_encoder/branch_out"][0][:, 0])
  check("dbg/clip_encoder.mix_logits", "features", lambda: inter["clip_encoder/mix_logits"][0])
  check("dbg/frame_encoder_1.mix_logits", "features", lambda: inter["frame_encoder/mix_logits"][0])
  return out


def _check_losses(check: GoldenChecks, model: MSCNet, params: Any, batch: dict[str, jax.Array],
                  out: dict[str, jax.Array], loss_cfg: LossConfig, meta: Mapping[str, Any]) -> None:
  """3. Losses and gradients. Reference triplets are random unless hard negatives with a pool of 1."""
  g = check.golden
  deterministic_triplet = bool(meta.get("use_hard_negative", False)) and loss_cfg.hard_pool_size == 1
  key = jax.random.key(0)

  def total_loss(p):
    o = model.apply({"params": p}, batch, deterministic=True)
    return msc_loss(o, batch, loss_cfg, key, deterministic_triplet)

  (total, parts), grads = jax.jit(jax.value_and_grad(total_loss, has_aux=True))(params)
  terms = jax.jit(lambda o, b: cbva_terms(o, b, loss_cfg))(out, batch)
  check("out/intra_diff", "ratio", terms["omega"])
  check("cbva/clip_count", "exact", terms["clip_count"])
  check("cbva/labels_per_level", "exact", terms["labels_per_level"])
  check("cbva/final_labels", "exact", terms["labels"])
  check("cbva/final_sizes", "exact", terms["sizes"])
  check("cbva/final_segments", "features", terms["segments"])
  for name in ("per_video_loss", "per_video_f2c", "per_video_c2f"):
    check(f"cbva/{name}", "loss", terms[name])
  weighted = dict(clip_nce="clip_nce", frame_nce="frame_nce", vidlvlctl="cbva", txt_rkd="tcpl")
  for ref_name, ours in weighted.items():
    check(f"loss/{ref_name}", "loss", parts[ours])
  check("loss/clip_num", "exact", parts["clip_count"])
  unweighted = dict(clip_nce_unweighted="clip_nce_unweighted", frame_nce_unweighted="frame_nce_unweighted",
                    rkd_distance="tcpl_distance", rkd_angle="tcpl_angle", vidlvl_unweighted="cbva_unweighted")
  for ref_name, ours in unweighted.items():
    check(f"loss_parts/{ref_name}", "loss", parts[ours])
  random_keys = ("loss/clip_trip", "loss/frame_trip", "loss/loss_overall", "loss/total")
  if not deterministic_triplet:
    for k in random_keys + tuple(k for k in g if k.startswith("grad/")):
      if k in g:
        check.rows.append(Row(k, "loss", note="skipped: the reference drew random triplet negatives"))
    return
  check("loss/clip_trip", "loss", parts["clip_trip"])
  check("loss/frame_trip", "loss", parts["frame_trip"])
  check("loss/loss_overall", "loss", total)
  check("loss/total", "loss", total)
  torch_grads = params_to_torch_names(grads)
  for key_name in sorted(k for k in g if k.startswith("grad/")):
    name = key_name[len("grad/"):]
    if name not in torch_grads:
      check.rows.append(Row(key_name, "grad", ok=False, note="no such parameter in our model"))
      continue
    check.rows.append(_compare(key_name, "grad", torch_grads[name], g[key_name]))


def run_parity(path: str | pathlib.Path) -> list[Row]:
  """Runs the pipeline on the golden file at `path`; one `Row` per compared (or skipped) key:
  1. preprocessing and OP-ToMe, 2. the network, 3. losses and gradients, 4. evaluation."""
  g = load_golden(path)
  meta, model_cfg, params, loss_cfg = model_from_golden(g, path)
  length = int(meta.get("map_size", model_cfg.num_frames))
  check = GoldenChecks(g)
  batch = check_inputs(g, check, length)
  model = MSCNet(model_cfg)
  out = _check_network(check, model, params, batch)
  _check_losses(check, model, params, batch, out, loss_cfg, meta)
  if "val_input/frames" in g:
    check.rows.extend(_eval_rows(g, model, params, length, meta))
  return check.rows


def _eval_rows(g: Mapping[str, np.ndarray], model: MSCNet, params: Any, length: int,
               meta: Mapping[str, Any]) -> list[Row]:
  rows: list[Row] = []

  def check(key: str, kind: str, ours: Any) -> None:
    if key in g:
      rows.append(_compare(key, kind, ours, g[key]))

  vb = _video_batch(g["val_input/frames"], g["val_input/frame_offsets"], length)
  text_feat, text_mask = _captions(g["val_input/caps"], g["val_input/cap_offsets"], "val caption")
  q_order = np.asarray(g.get("eval/query_order", np.arange(len(text_feat))))
  v_order = np.asarray(g.get("eval/video_order", np.arange(len(vb["fixed"]))))
  clip_w, frame_w = float(meta.get("clip_scale_w", 0.4)), float(meta.get("frame_scale_w", 0.6))

  @jax.jit
  def encode(p, clip_feat, merge_size, frame_feat, frame_mask, tf, tm):
    clip_tokens = model.apply({"params": p}, clip_feat, merge_size, method=MSCNet.encode_clips)
    frame_tokens = model.apply({"params": p}, frame_feat, frame_mask, method=MSCNet.encode_frames)
    query, _ = model.apply({"params": p}, tf, tm, method=MSCNet.encode_query)
    return clip_tokens, frame_tokens, l2_normalize(query)

  clip_tokens, frame_tokens, query = encode(
      params, vb["clip_video_features"], vb["merge_size"], vb["frame_video_features"],
      vb["videos_mask"], text_feat, text_mask)
  clip = max_token_scores(query, clip_tokens, normalize=True)
  frame = max_token_scores(query, frame_tokens, normalize=True)
  fused = fused_scores(clip, frame, clip_w, frame_w)
  reorder = lambda s: np.asarray(s)[q_order][:, v_order]
  check("eval/in/clip_video_features", "features", vb["clip_video_features"][v_order])
  check("eval/in/frame_video_features", "features", vb["frame_video_features"][v_order])
  check("eval/in/videos_mask", "features", vb["videos_mask"][v_order])
  check("eval/in/merge_size", "exact", vb["merge_size"][v_order])
  if "eval/in/text_feat" in g:
    lmax = g["eval/in/text_feat"].shape[1]
    check("eval/in/text_feat", "features", _pad_to(text_feat, lmax)[q_order])
    check("eval/in/text_mask", "features", _pad_to(text_mask, lmax)[q_order])
  check("eval/video_proposal_feat", "features", np.asarray(clip_tokens)[v_order])
  check("eval/video_query", "features", np.asarray(query)[q_order])
  check("eval/score_clip", "features", reorder(clip))
  check("eval/score_frame", "features", reorder(frame))
  check("eval/score_sum", "features", reorder(fused))
  cap_video = np.asarray(g["val_input/cap_video"])
  gt = cap_video[:, None] == np.arange(len(vb["fixed"]))[None, :]
  check("eval/gt_video", "exact", np.asarray(cap_video)[q_order])
  for key, scores in (("eval/r_sum", fused), ("eval/r_clip", clip), ("eval/r_frame", frame)):
    r = recall_at_k(gt_ranks(scores, jnp.asarray(gt)))
    check(key, "exact", np.array([r["R@1"], r["R@5"], r["R@10"], r["R@100"], r["SumR"]]))
  return rows


def _pad_to(x: np.ndarray, length: int) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return np.pad(x, pad)


def print_report(rows: list[Row]) -> bool:
  """Prints the comparison table; returns True when every compared key is within tolerance."""
  header = f"{'key':48s} {'kind':8s} {'max_abs':>10s} {'max_rel':>10s} {'atol':>8s} {'rtol':>8s}  status"
  print(header)
  print("-" * len(header))
  for r in rows:
    atol, rtol = r.tolerance
    status = "skip" if r.ok is None else ("ok" if r.ok else "FAIL")
    print(f"{r.key:48s} {r.kind:8s} {r.max_abs:10.2e} {r.max_rel:10.2e} {atol:8.0e} {rtol:8.0e}  "
          f"{status}{'  ' + r.note if r.note else ''}")
  failed = [r.key for r in rows if r.ok is False]
  compared = sum(r.ok is not None for r in rows)
  print(f"\n{compared} keys compared, {len(failed)} failed, {sum(r.ok is None for r in rows)} skipped")
  if failed:
    print("FAILED: " + ", ".join(failed))
  return not failed and compared > 0
