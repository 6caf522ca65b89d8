"""Loads a Hugging Face CLIPModel checkpoint from a local directory into our params, strictly.

A directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Every tensor is matched by name against the table that the config
implies (`expected_tensors`): a missing, unexpected, mis-shaped or non-finite tensor is a
`CheckpointError` naming the tensor and the file. Tensors are read as numpy (no torch) and stored
as float32.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, NamedTuple, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from prvr_jax.clip.config import ClipConfig, TowerConfig, read_config
from prvr_jax.errors import PrvrError

TOWERS = ("text", "vision")
# Tensors a checkpoint may carry that encoding does not use: the contrastive temperature, and
# position-id buffers that older transformers versions saved.
_UNUSED = ("logit_scale", "text_model.embeddings.position_ids",
           "vision_model.embeddings.position_ids")


class CheckpointError(PrvrError, ValueError):
  """A checkpoint that does not match the config; the message names the file and the tensor."""


class TensorSpec(NamedTuple):
  """Where one checkpoint tensor goes.

  Attributes:
    path: key path in our params['params'] tree.
    shape: the tensor's shape in the checkpoint (PyTorch layout).
    transform: 'T' (Linear (out, in) -> kernel (in, out)), 'conv' ((D, C, p, p) -> (p, p, C, D))
      or '' (as is).
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  transform: str


def _tower_tensors(prefix: str, ours: str, cfg: TowerConfig) -> dict[str, TensorSpec]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  out = {}
  for i in range(cfg.num_layers):
    hf, me = f"{prefix}.encoder.layers.{i}", (ours, "encoder", f"layers_{i}")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out[f"{hf}.self_attn.{proj}.weight"] = TensorSpec((*me, "self_attn", proj, "kernel"), (d, d), "T")
      out[f"{hf}.self_attn.{proj}.bias"] = TensorSpec((*me, "self_attn", proj, "bias"), (d,), "")
    for ln in ("layer_norm1", "layer_norm2"):
      out[f"{hf}.{ln}.weight"] = TensorSpec((*me, ln, "scale"), (d,), "")
      out[f"{hf}.{ln}.bias"] = TensorSpec((*me, ln, "bias"), (d,), "")
    for fc, (n_out, n_in) in (("fc1", (f, d)), ("fc2", (d, f))):
      out[f"{hf}.mlp.{fc}.weight"] = TensorSpec((*me, "mlp", fc, "kernel"), (n_out, n_in), "T")
      out[f"{hf}.mlp.{fc}.bias"] = TensorSpec((*me, "mlp", fc, "bias"), (n_out,), "")
  return out


def _layer_norm(hf: str, path: tuple[str, ...], d: int) -> dict[str, TensorSpec]:
  return {f"{hf}.weight": TensorSpec((*path, "scale"), (d,), ""),
          f"{hf}.bias": TensorSpec((*path, "bias"), (d,), "")}


def expected_tensors(config: ClipConfig, towers: Sequence[str] = TOWERS) -> dict[str, TensorSpec]:
  """Every checkpoint tensor name the given towers need, with its destination and shape.

  Args:
    config: the model shape.
    towers: subset of ('text', 'vision'); a tower's projection comes with it.

  Returns:
    {transformers tensor name: TensorSpec}.
  """
  out: dict[str, TensorSpec] = {}
  p = config.projection_dim
  if "text" in towers:
    t = config.text
    out["text_model.embeddings.token_embedding.weight"] = TensorSpec(
        ("text_model", "token_embedding", "embedding"), (t.vocab_size, t.hidden_size), "")
    out["text_model.embeddings.position_embedding.weight"] = TensorSpec(
        ("text_model", "position_embedding"), (t.max_positions, t.hidden_size), "")
    out.update(_tower_tensors("text_model", "text_model", t))
    out.update(_layer_norm("text_model.final_layer_norm", ("text_model", "final_layer_norm"),
                           t.hidden_size))
    out["text_projection.weight"] = TensorSpec(("text_projection", "kernel"), (p, t.hidden_size), "T")
  if "vision" in towers:
    v = config.vision
    d = v.hidden_size
    out["vision_model.embeddings.class_embedding"] = TensorSpec(
        ("vision_model", "class_embedding"), (d,), "")
    out["vision_model.embeddings.patch_embedding.weight"] = TensorSpec(
        ("vision_model", "patch_embedding"), (d, v.num_channels, v.patch_size, v.patch_size), "conv")
    out["vision_model.embeddings.position_embedding.weight"] = TensorSpec(
        ("vision_model", "position_embedding"), (v.grid * v.grid + 1, d), "")
    out.update(_layer_norm("vision_model.pre_layrnorm", ("vision_model", "pre_layrnorm"), d))
    out.update(_tower_tensors("vision_model", "vision_model", v))
    out.update(_layer_norm("vision_model.post_layernorm", ("vision_model", "post_layernorm"), d))
    out["visual_projection.weight"] = TensorSpec(("visual_projection", "kernel"), (p, d), "T")
  return out


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or another "
                          f"format?): {e}") from None


def read_checkpoint_tensors(directory: str | os.PathLike) -> dict[str, tuple[np.ndarray, pathlib.Path]]:
  """All tensors of a local checkpoint directory, each with the file it came from.

  Args:
    directory: holds model.safetensors, or model.safetensors.index.json and its shards.

  Returns:
    {tensor name: (array, file)}.

  Raises:
    CheckpointError: no safetensors weights, an unreadable file, or an index that disagrees with
      its shards.
  """
  directory = pathlib.Path(directory)
  single = directory / "model.safetensors"
  index = directory / "model.safetensors.index.json"
  if single.is_file():
    return {k: (v, single) for k, v in _read_safetensors(single).items()}
  if not index.is_file():
    found = sorted(p.name for p in directory.glob("*")) if directory.is_dir() else []
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                          f"(found: {', '.join(found) or 'nothing'}); PyTorch .bin checkpoints are "
                          "not read, save the model with safe_serialization")
  try:
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError(f"weight_map is a {type(weight_map).__name__}, expected an object")
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index}: not a safetensors index with a weight_map: {e!r}") from None
  out: dict[str, tuple[np.ndarray, pathlib.Path]] = {}
  for shard_name in sorted(set(weight_map.values())):
    shard = directory / str(shard_name)
    if not shard.is_file():
      raise CheckpointError(f"{index}: shard {shard_name!r} not found in {directory}")
    for name, arr in _read_safetensors(shard).items():
      if name in out:
        raise CheckpointError(f"{shard}: tensor {name!r} is also in {out[name][1]}")
      if weight_map.get(name) != shard_name:
        raise CheckpointError(f"{shard}: tensor {name!r} is not listed for this shard in {index}")
      out[name] = (arr, shard)
  for name, shard_name in weight_map.items():
    if name not in out:
      raise CheckpointError(f"{directory / str(shard_name)}: tensor {name!r} listed in {index} "
                            "is missing")
  return out


def _transform(arr: np.ndarray, how: str) -> np.ndarray:
  if how == "T":
    return arr.T
  if how == "conv":
    return arr.transpose(2, 3, 1, 0)
  return arr


def params_from_tensors(config: ClipConfig, tensors: dict[str, tuple[np.ndarray, pathlib.Path]],
                        towers: Sequence[str] = TOWERS, source: str = "checkpoint") -> dict[str, Any]:
  """Maps checkpoint tensors onto our params tree, strictly.

  Args:
    config: the model shape.
    tensors: {name: (array, file)} as from read_checkpoint_tensors.
    towers: which towers to build; the other tower's tensors are skipped, not errors.
    source: the checkpoint's name for messages about missing tensors.

  Returns:
    {'params': nested dict of float32 numpy arrays}.

  Raises:
    CheckpointError: naming the first missing / unexpected / mis-shaped / non-float / non-finite
      tensor and its file.
  """
  unknown = [t for t in towers if t not in TOWERS]
  if unknown or not towers:
    raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {tuple(towers)}")
  wanted = expected_tensors(config, towers)
  every = expected_tensors(config, TOWERS)
  unexpected = sorted(n for n in tensors if n not in every and n not in _UNUSED)
  if unexpected:
    name = unexpected[0]
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise CheckpointError(f"{tensors[name][1]}: unexpected tensor {name!r}{more}: not part of a "
                          "CLIPModel with this config.json")
  missing = sorted(n for n in wanted if n not in tensors)
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}, expected shape "
                          f"{wanted[missing[0]].shape}")
  for name in every:
    if name in tensors and tuple(tensors[name][0].shape) != every[name].shape:
      raise CheckpointError(f"{tensors[name][1]}: tensor {name!r} has shape "
                            f"{tuple(tensors[name][0].shape)}, config.json implies {every[name].shape}")
  tree: dict[str, Any] = {}
  for name, spec in wanted.items():
    arr, file = tensors[name]
    if arr.dtype.kind != "f" and str(arr.dtype) != "bfloat16":  # numpy's bf16 comes from ml_dtypes
      raise CheckpointError(f"{file}: tensor {name!r} has dtype {arr.dtype}, expected floating point")
    arr = np.asarray(arr, np.float32)
    if not np.all(np.isfinite(arr)):
      raise CheckpointError(f"{file}: tensor {name!r} contains NaN or inf")
    node = tree
    for key in spec.path[:-1]:
      node = node.setdefault(key, {})
    node[spec.path[-1]] = np.ascontiguousarray(_transform(arr, spec.transform))
  return {"params": tree}


def load_clip(directory: str | os.PathLike,
              towers: Sequence[str] = TOWERS) -> tuple[ClipConfig, dict[str, Any]]:
  """Reads config.json and the safetensors weights of a local CLIPModel checkpoint.

  Args:
    directory: the checkpoint directory (as written by `CLIPModel.save_pretrained`).
    towers: ('text', 'vision') or one of them (saves memory when only one is needed).

  Returns:
    (config, params) with params = {'params': ...} for `ClipEncoders`.

  Raises:
    ClipConfigError, CheckpointError: naming the file and the field or tensor.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: CLIP checkpoint directory not found")
  config = read_config(directory)
  tensors = read_checkpoint_tensors(directory)
  return config, params_from_tensors(config, tensors, towers, source=str(directory))


def tensors_from_params(config: ClipConfig, params: dict[str, Any],
                        towers: Sequence[str] = TOWERS) -> dict[str, np.ndarray]:
  """The inverse of `params_from_tensors`: our params -> checkpoint tensors (PyTorch layout).

  Args:
    config: the model shape.
    params: {'params': ...} as from ClipEncoders.init or load_clip.
    towers: which towers to export.

  Returns:
    {transformers tensor name: float32 array}, ready for `safetensors.numpy.save_file`.
  """
  out = {}
  for name, spec in expected_tensors(config, towers).items():
    node = params["params"]
    for key in spec.path:
      node = node[key]
    arr = np.asarray(node, np.float32)
    if spec.transform == "T":
      arr = arr.T
    elif spec.transform == "conv":
      arr = arr.transpose(3, 2, 0, 1)
    out[name] = np.ascontiguousarray(arr)
  return out
