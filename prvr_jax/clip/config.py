"""Shapes of the CLIP towers, read from a transformers CLIPConfig (or its config.json).

Frozen and hashable, so a config can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

from prvr_jax.errors import PrvrError
from prvr_jax.text.tokenizer import CLIP_CONTEXT_LENGTH

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


class ClipConfigError(PrvrError, ValueError):
  """A config.json that does not describe a CLIP model we can build; names the file and field."""


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower.

  Attributes:
    hidden_size: width D.
    intermediate_size: MLP width.
    num_layers: encoder layers.
    num_heads: attention heads (hidden_size must be a multiple).
    activation: one of ACTIVATIONS (transformers' `hidden_act` names).
    layer_norm_eps: LayerNorm epsilon.
  """

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  activation: str
  layer_norm_eps: float


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
  """The text tower: tower shape plus vocabulary, positions and the pooling rule's EOS id."""

  vocab_size: int = 49408
  max_positions: int = 77
  eos_token_id: int = 49407

  @property
  def context_length(self) -> int:
    """Token ids per text (BOS ... EOS, padded): CLIP's 77, or fewer if the tower has fewer
    positions."""
    return min(CLIP_CONTEXT_LENGTH, self.max_positions)


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
  """The vision tower: tower shape plus the square input image and patch size."""

  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Both towers and the shared embedding size P."""

  text: TextConfig
  vision: VisionConfig
  projection_dim: int


def _tower_fields(d: Mapping[str, Any], where: str) -> dict[str, Any]:
  try:
    out = dict(hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
               num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
               activation=str(d.get("hidden_act", "quick_gelu")),
               layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)))
  except KeyError as e:
    raise ClipConfigError(f"{where}: missing field {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise ClipConfigError(f"{where}: bad value: {e}") from None
  if out["activation"] not in ACTIVATIONS:
    raise ClipConfigError(f"{where}: hidden_act {out['activation']!r} is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
  if out["hidden_size"] % out["num_heads"]:
    raise ClipConfigError(f"{where}: hidden_size {out['hidden_size']} is not a multiple of "
                          f"num_attention_heads {out['num_heads']}")
  return out


def config_from_dict(d: Mapping[str, Any], source: str = "CLIPConfig") -> ClipConfig:
  """Builds a ClipConfig from a full `transformers.CLIPConfig.to_dict()`.

  config.json files may omit fields equal to transformers' defaults: read them with `read_config`,
  which fills them in through transformers.

  Args:
    d: the config dict.
    source: name used in error messages (the file).

  Returns:
    The ClipConfig.

  Raises:
    ClipConfigError: a missing field, unsupported activation or inconsistent shape.
  """
  if "text_config" not in d or "vision_config" not in d:
    raise ClipConfigError(f"{source}: not a CLIPModel config (needs text_config and vision_config; "
                          f"model_type {d.get('model_type')!r})")
  t, v = d["text_config"], d["vision_config"]
  text = TextConfig(**_tower_fields(t, f"{source}: text_config"),
                    vocab_size=int(t.get("vocab_size", 49408)),
                    max_positions=int(t.get("max_position_embeddings", 77)),
                    eos_token_id=int(t.get("eos_token_id", 49407)))
  vision = VisionConfig(**_tower_fields(v, f"{source}: vision_config"),
                        image_size=int(v.get("image_size", 224)),
                        patch_size=int(v.get("patch_size", 32)),
                        num_channels=int(v.get("num_channels", 3)))
  if vision.image_size % vision.patch_size:
    raise ClipConfigError(f"{source}: vision_config image_size {vision.image_size} is not a "
                          f"multiple of patch_size {vision.patch_size}")
  return ClipConfig(text=text, vision=vision, projection_dim=int(d.get("projection_dim", 512)))


def config_from_hf(hf_config: Any) -> ClipConfig:
  """ClipConfig from a `transformers.CLIPConfig` object."""
  return config_from_dict(hf_config.to_dict(), source=type(hf_config).__name__)


def read_config(path: str | os.PathLike) -> ClipConfig:
  """Reads a checkpoint's config.json (a file, or the directory holding it).

  Args:
    path: config.json or its directory.

  Returns:
    The ClipConfig.

  Raises:
    ClipConfigError: missing or unreadable file, or not a CLIP config.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "config.json"
  if not path.is_file():
    raise ClipConfigError(f"{path}: CLIP config.json not found")
  try:
    d = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ClipConfigError(f"{path}: not a JSON file: {e}") from None
  if not isinstance(d, dict):
    raise ClipConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
  if d.get("model_type") not in (None, "clip") or "text_config" not in d or "vision_config" not in d:
    raise ClipConfigError(f"{path}: not a CLIPModel config (needs model_type 'clip' with "
                          f"text_config and vision_config; got model_type {d.get('model_type')!r})")
  # Here, not at the top: transformers takes 1.4 s to import, and every run imports this module
  # (the model's config holds a TextConfig) whether or not it reads a CLIP checkpoint.
  from transformers import CLIPConfig  # pylint: disable=import-outside-toplevel

  try:
    hf = CLIPConfig.from_dict(d)
  except (TypeError, ValueError, KeyError) as e:
    raise ClipConfigError(f"{path}: transformers cannot read it as a CLIPConfig: {e}") from None
  return config_from_dict(hf.to_dict(), source=str(path))
