"""The authors' PyTorch MSC weights (a state_dict) <-> prvr_jax parameters, by parameter name.

Accepts the parameter names of `MSC_PRVR_Net.state_dict()` (as stored under `param/*` in the golden
files, or read from the authors' `.ckpt` by `torch_msc.load_torch_checkpoint`). Numpy and flax
only: no torch needed.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from prvr_jax.errors import PrvrError
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import init_params


class ConversionError(PrvrError, ValueError):
  """A state_dict that does not describe an MSC network; the message names the offending key."""


# Renames applied to dotted torch names, in order, before the leaf rule below.
_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    (r"^frame_encoder_1\.", "frame_encoder."),
    (r"\.attn(\d)\.", r".branch\1."),
    (r"\.ca\.self\.", ".mixer_attention."),
    (r"\.ca\.output\.", ".mixer_attention.ffn."),
    (r"\.ca\.norm", ".mixer_attention.norm"),
    (r"_encoder\.layer([12])\.", r"_encoder.mixer\1."),
    (r"\.self\.(query|key|value)\.", r".attention.\1."),
    (r"\.output\.layer", ".ffn.layer"),
    (r"_input_proj\.net\.1\.", "_input_proj.linear."),
    (r"_input_proj\.LayerNorm\.", "_input_proj.layer_norm."),
    (r"_pos_embed\.LayerNorm\.", "_pos_embed.layer_norm."),
    (r"_pos_embed\.position_embeddings\.weight$", "_pos_embed.embedding"),
    (r"^modular_vector_mapping\.", "query_pool."),
)
# The mixer attention's key/value are stored as bare (kernel, bias) holders, not Linear modules.
_LAYER_NORM_RE = re.compile(r"(layer_norm|norm[12])\.weight$")


def torch_name_to_path(name: str) -> tuple[tuple[str, ...], str]:
  """Maps a torch parameter name to (our flattened param path, transform).

  transform is 'T' (Linear weight (out, in) -> kernel (in, out)), 'flat' (weight_token
  (1, 1, D) -> (D,)) or '' (copied as is).
  """
  if name == "weight_token":
    return ("weight_token",), "flat"
  dotted = name
  for pattern, repl in _PREFIX_RULES:
    dotted = re.sub(pattern, repl, dotted)
  transform = ""
  if _LAYER_NORM_RE.search(dotted):
    dotted = dotted[: -len("weight")] + "scale"
  elif dotted.endswith(".weight"):
    dotted = dotted[: -len("weight")] + "kernel"
    transform = "T"
  return tuple(dotted.split(".")), transform


def to_numpy(value: Any, name: str) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  arr = np.asarray(value)
  if arr.dtype.kind != "f":
    raise ConversionError(f"parameter {name!r} has dtype {arr.dtype}, expected floating point")
  if not np.all(np.isfinite(arr)):
    raise ConversionError(f"parameter {name!r} contains NaN or inf")
  return arr.astype(np.float32)


def infer_model_config(state_dict: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """Reads every shape-determined field of `ModelConfig` from the state_dict.

  Fields that shapes cannot tell (num_heads, sft_factor, dropouts) come from `overrides` or the
  defaults of `ModelConfig`.
  """
  def shape(key: str) -> tuple[int, ...]:
    if key not in state_dict:
      raise ConversionError(f"state_dict has no parameter {key!r}; is this an MSC_PRVR_Net checkpoint?")
    return tuple(np.shape(to_numpy(state_dict[key], key)))

  fields = dict(
      hidden_size=shape("vproj_clip.weight")[0],
      visual_input_size=shape("clip_input_proj.net.1.weight")[1],
      query_input_size=shape("query_input_proj.net.1.weight")[1],
      max_desc_len=shape("query_pos_embed.position_embeddings.weight")[0],
      max_ctx_len=shape("clip_pos_embed.position_embeddings.weight")[0],
      num_clips=shape("clip_encoder.layer2.weight")[0],
      num_frames=shape("frame_encoder_1.layer2.weight")[0],
  )
  frame_ctx = shape("frame_pos_embed.position_embeddings.weight")[0]
  if frame_ctx != fields["max_ctx_len"]:
    raise ConversionError(
        f"clip and frame positional tables differ ({fields['max_ctx_len']} vs {frame_ctx} rows)")
  fields.update(overrides)
  return ModelConfig(**fields)


def convert_state_dict(state_dict: Mapping[str, Any], reference_params: Any) -> Any:
  """Maps an MSC_PRVR_Net state_dict onto a params tree shaped like `reference_params`.

  Every torch parameter must land on exactly one of our parameters with the right shape, and every
  one of ours must be filled; anything else raises `ConversionError` naming the key.

  Args:
    state_dict: torch name -> tensor / array.
    reference_params: our params pytree (e.g. from `init_params` or `jax.eval_shape`), used for the
      expected paths and shapes only.

  Returns:
    A params pytree (nested dicts of float32 numpy arrays) with our layout.
  """
  expected = traverse_util.flatten_dict(reference_params)
  out: dict[tuple[str, ...], np.ndarray] = {}
  for name, value in state_dict.items():
    path, transform = torch_name_to_path(name)
    if path not in expected:
      raise ConversionError(f"torch parameter {name!r} maps to unknown parameter {'/'.join(path)!r}")
    arr = to_numpy(value, name)
    if transform == "T":
      arr = arr.T
    elif transform == "flat":
      arr = arr.reshape(-1)
    want = tuple(np.shape(expected[path]))
    if arr.shape != want:
      raise ConversionError(
          f"torch parameter {name!r} has shape {np.shape(value)}, which maps to {arr.shape}; "
          f"{'/'.join(path)} needs {want}")
    if path in out:
      raise ConversionError(f"two torch parameters map to {'/'.join(path)!r} (second: {name!r})")
    out[path] = np.ascontiguousarray(arr)
  missing = sorted("/".join(p) for p in expected if p not in out)
  if missing:
    raise ConversionError(f"the state_dict lacks {len(missing)} parameters, e.g. {missing[:5]}")
  return traverse_util.unflatten_dict(out)


def torch_name_index(tree: Any) -> dict[tuple[str, ...], tuple[str, str]]:
  """Our flattened param path -> (torch name, transform), from the tree's structure only.

  Works on params, gradients, masks or abstract shapes (no values are read).
  """
  flat = traverse_util.flatten_dict(tree)
  index: dict[tuple[str, ...], tuple[str, str]] = {}
  for torch_name in _candidate_torch_names(flat.keys()):
    path, transform = torch_name_to_path(torch_name)
    if path in flat:
      index[path] = (torch_name, transform)
  unnamed = sorted("/".join(p) for p in flat if p not in index)
  if unnamed:
    raise ConversionError(f"parameters with no torch counterpart: {unnamed[:5]}")
  return index


def params_to_torch_names(tree: Any) -> dict[str, np.ndarray]:
  """A params-shaped tree (params or gradients) as torch name -> array in torch layout."""
  flat = traverse_util.flatten_dict(tree)
  out = {}
  for path, (torch_name, transform) in torch_name_index(tree).items():
    arr = np.asarray(flat[path])
    if transform == "T":
      arr = arr.T
    elif transform == "flat":
      arr = arr.reshape(1, 1, -1)
    out[torch_name] = arr
  return out


def _candidate_torch_names(paths) -> list[str]:
  """The torch names of an MSC_PRVR_Net with the given branch structure (for `params_to_torch_names`)."""
  names = ["weight_token", "modular_vector_mapping.weight", "vproj_clip.weight", "vproj_clip.bias"]
  for pre in ("query", "clip", "frame"):
    names += [f"{pre}_pos_embed.position_embeddings.weight"]
    names += [f"{pre}_pos_embed.LayerNorm.{w}" for w in ("weight", "bias")]
    names += [f"{pre}_input_proj.LayerNorm.{w}" for w in ("weight", "bias")]
    names += [f"{pre}_input_proj.net.1.{w}" for w in ("weight", "bias")]

  def bert(prefix: str) -> list[str]:
    n = [f"{prefix}.self.{p}.{w}" for p in ("query", "key", "value") for w in ("weight", "bias")]
    n += [f"{prefix}.output.layer{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    n += [f"{prefix}.norm{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    return n

  names += bert("query_encoder")
  branches = {p[1] for p in paths if len(p) > 1 and p[1].startswith("branch")}
  for enc in ("clip_encoder", "frame_encoder_1"):
    for b in sorted(branches):
      names += bert(f"{enc}.attn{b[len('branch'):]}")
    names += bert(f"{enc}.ca")
    names += [f"{enc}.layer{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
  return names


def golden_state_dict(golden: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The `param/*` entries of a golden file as a torch-named state_dict."""
  sd = {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}
  if not sd:
    raise ConversionError("the golden file has no param/* entries")
  return sd


def convert(state_dict: Mapping[str, Any], **config_overrides: Any) -> tuple[ModelConfig, Any]:
  """state_dict -> (ModelConfig, params). Shapes come from the state_dict."""
  config = infer_model_config(state_dict, **config_overrides)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return config, convert_state_dict(state_dict, shapes)
