"""Raw text -> query features / query vectors through a frozen CLIP text tower.

For a model trained with its own CLIP text tower (`config.text_tower.clip_dir`), queries go through
that tower instead (`encode_texts_with_model_tower`): no external checkpoint is needed.

Two forms of the same computation for a model trained on extracted caption features:
  * `text_token_features`: per text the (L, P) rows BOS ... EOS exactly as
    `python -m prvr_jax.extract captions` writes them (final-LayerNorm token states through
    text_projection, or the unprojected states with kind='hidden').
  * `make_text_query_encoder` (the in-model option): one jitted function from token ids to the
    L2-normalised MSC query vector: CLIP text tower -> projection -> the loader's per-row
    normalisation x / (||x|| + 1e-5) and truncation -> MSCNet.encode_query. The CLIP outputs pass
    through `stop_gradient`, so the tower stays frozen if this function is differentiated (e.g.
    inside a training step). Its result equals encoding the features that `extract captions`
    wrote for the same texts with the same checkpoint (tests/test_search.py checks it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from prvr_jax.clip.load import load_clip
from prvr_jax.clip.model import ClipEncoders
from prvr_jax.data.pipeline import CaptionTokenizer
from prvr_jax.eval.evaluate import make_query_encoder
from prvr_jax.models.caption_tower import caption_rows
from prvr_jax.models.msc import MSCNet
from prvr_jax.ops.similarity import l2_normalize
from prvr_jax.search.errors import SearchError
from prvr_jax.search.model import SearchModel
from prvr_jax.text.tokenizer import ClipTokenizer

TEXT_KINDS = ("projected", "hidden")
DEFAULT_TEXT_BATCH = 64


@dataclasses.dataclass
class ClipTextTower:
  """A loaded CLIP text tower and its tokenizer.

  Attributes:
    encoders: the jitted CLIP encoders.
    params: CLIP parameters (the text tower and its projection).
    tokenizer: the offline CLIP tokenizer (max_length <= the tower's positions).
    kind: 'projected' (rows through text_projection, width P) or 'hidden' (width D).
    source: the checkpoint directory, for messages.
  """

  encoders: ClipEncoders
  params: Any
  tokenizer: ClipTokenizer
  kind: str
  source: str

  @property
  def dim(self) -> int:
    """Width of the token features this tower gives."""
    cfg = self.encoders.config
    return cfg.projection_dim if self.kind == "projected" else cfg.text.hidden_size


def load_text_tower(clip_dir: str | os.PathLike, kind: str = "projected",
                    precision: str = "highest") -> ClipTextTower:
  """Loads the text tower of a local CLIP checkpoint.

  Args:
    clip_dir: a Hugging Face CLIPModel directory (config.json + safetensors).
    kind: 'projected' or 'hidden'; must be what the training captions were extracted with.
    precision: 'highest' or 'default' float32 matmuls.

  Returns:
    The tower.

  Raises:
    SearchError: bad kind or a vocabulary smaller than CLIP's; CheckpointError / ClipConfigError
      from the loader (naming the file and tensor).
  """

  if kind not in TEXT_KINDS:
    raise SearchError(f"--text-kind must be one of {TEXT_KINDS}, got {kind!r}")
  config, params = load_clip(clip_dir, towers=("text",))
  tokenizer = ClipTokenizer(max_length=config.text.context_length)
  if config.text.vocab_size < tokenizer.vocab_size:
    raise SearchError(f"{clip_dir}: text vocab_size {config.text.vocab_size} is smaller than the "
                      f"CLIP tokenizer's {tokenizer.vocab_size}: not a CLIP text tower")
  return ClipTextTower(ClipEncoders(config, precision), params, tokenizer, kind, str(clip_dir))


def _token_states(tower: ClipTextTower, clip_params: Any, input_ids: jax.Array,
                  attention_mask: jax.Array) -> jax.Array:
  """(N, L) ids -> (N, L, P or D) token rows (projected or hidden), frozen."""
  states, _, _ = tower.encoders.encode_text(clip_params, input_ids, attention_mask)
  if tower.kind == "projected":
    states = tower.encoders.project_text_tokens(clip_params, states)
  return jax.lax.stop_gradient(states)


def text_token_features(tower: ClipTextTower, texts: Sequence[str],
                        batch: int = DEFAULT_TEXT_BATCH) -> list[np.ndarray]:
  """Token features of raw texts, as `python -m prvr_jax.extract captions` writes them.

  Args:
    tower: the CLIP text tower.
    texts: N strings.
    batch: texts per device call (fixed; the last batch is padded with empty texts).

  Returns:
    N arrays (L_i, P) float32, rows BOS ... EOS (L_i <= 77, longer texts truncated keeping EOS).
  """
  out = []
  for start in range(0, len(texts), batch):
    part = list(texts[start:start + batch])
    tok = tower.tokenizer(part + [""] * (batch - len(part)))
    states = np.asarray(_token_states(tower, tower.params, tok.input_ids, tok.attention_mask))
    out.extend(states[i, :int(tok.attention_mask[i].sum())] for i in range(len(part)))
  return out


def make_text_query_encoder(tower: ClipTextTower, model: SearchModel) -> Callable[..., jax.Array]:
  """The in-model raw-text query encoder: one jitted CLIP text tower + MSC query encoder.

  Args:
    tower: the frozen CLIP text tower (kind and width must match the model's query input).
    model: the MSC network.

  Returns:
    jitted fn(clip_params, msc_params, input_ids (N, L0), attention_mask (N, L0)) -> (N, D)
    L2-normalised query vectors.

  Raises:
    SearchError: the tower's token width is not the model's query_input_size.
  """
  if model.model_cfg.caption_tower is not None:
    raise SearchError(f"the model {model.name} runs its own CLIP text tower (initialised from "
                      f"{model.model_cfg.caption_tower.source}); query it without --clip")
  want = model.model_cfg.query_input_size
  if tower.dim != want:
    raise SearchError(f"{tower.source}: the CLIP text tower gives {tower.dim}-d {tower.kind} token "
                      f"features, the model {model.name} takes {want}-d (model.query_input_size); "
                      "use the CLIP checkpoint (and --text-kind) the training captions were "
                      "extracted with")
  net = MSCNet(model.model_cfg)

  @jax.jit
  def encode(clip_params, msc_params, input_ids, attention_mask):
    states = _token_states(tower, clip_params, input_ids, attention_mask)
    feat, mask = caption_rows(states, attention_mask, model.max_query_tokens,
                              model.truncate_keep_eos)
    pooled, _ = net.apply({"params": msc_params}, feat, mask, method=MSCNet.encode_query)
    return l2_normalize(pooled)

  return encode


TextEncoder = Callable[[Sequence[str]], np.ndarray]


def clip_text_encoder(tower: ClipTextTower, model: SearchModel) -> TextEncoder:
  """A reusable raw-text query encoder through an external frozen CLIP text tower.

  Built once (one jitted function, CLIP parameters put on the device once); each distinct number
  of texts compiles once, so a caller that pads to a few fixed sizes never recompiles.

  Args:
    tower: the CLIP text tower.
    model: the MSC network.

  Returns:
    fn(texts: N strings) -> (N, D) float32 L2-normalised query vectors.
  """
  encode = make_text_query_encoder(tower, model)
  clip_params = jax.device_put(tower.params, jax.local_devices()[0])  # once, not per batch

  def encode_batch(texts: Sequence[str]) -> np.ndarray:
    tok = tower.tokenizer(list(texts))
    return np.asarray(encode(clip_params, model.params, tok.input_ids, tok.attention_mask))

  return encode_batch


def model_tower_text_encoder(model: SearchModel) -> TextEncoder:
  """A reusable raw-text query encoder for a model that runs its own CLIP text tower.

  Args:
    model: the MSC network (its ModelConfig has a caption tower, trained or frozen).

  Returns:
    fn(texts: N strings) -> (N, D) float32 L2-normalised: what evaluation computes for the same
    captions.

  Raises:
    SearchError: the model has no caption tower.
  """
  tower = model.model_cfg.caption_tower
  if tower is None:
    raise SearchError(f"the model {model.name} was trained on extracted caption features: pass "
                      "--clip CLIP_DIR (the checkpoint they were extracted with)")
  tokenizer = CaptionTokenizer(tower.token_length, tower.context_length)  # as the loader
  encode = make_query_encoder(model.model_cfg)

  def encode_batch(texts: Sequence[str]) -> np.ndarray:
    ids, mask = tokenizer(list(texts), len(texts))
    return np.asarray(encode(model.params, dict(caption_ids=ids, caption_id_mask=mask)))

  return encode_batch


def encode_in_batches(encoder: TextEncoder, texts: Sequence[str], batch: int) -> np.ndarray:
  """`encoder` over `texts` in device batches of a fixed size.

  Args:
    encoder: from `clip_text_encoder` or `model_tower_text_encoder`.
    texts: Q strings.
    batch: texts per device call (fixed; the last batch is padded with empty texts).

  Returns:
    (Q, D) float32.
  """
  batch = max(1, min(batch, len(texts)))
  out = []
  for start in range(0, len(texts), batch):
    part = list(texts[start:start + batch])
    out.append(encoder(part + [""] * (batch - len(part)))[:len(part)])
  return np.concatenate(out)


def encode_texts(tower: ClipTextTower, model: SearchModel, texts: Sequence[str],
                 batch: int = DEFAULT_TEXT_BATCH) -> np.ndarray:
  """Query vectors of raw texts (tokenised offline, then `make_text_query_encoder`).

  Args:
    tower: the CLIP text tower.
    model: the MSC network.
    texts: Q strings.
    batch: texts per device call (fixed; the last batch is padded with empty texts).

  Returns:
    (Q, D) float32 L2-normalised.
  """
  return encode_in_batches(clip_text_encoder(tower, model), texts, batch)


def encode_texts_with_model_tower(model: SearchModel, texts: Sequence[str],
                                  batch: int = DEFAULT_TEXT_BATCH) -> np.ndarray:
  """Query vectors of raw texts for a model that runs its own CLIP text tower.

  Args:
    model: the MSC network (its ModelConfig has a caption tower, trained or frozen).
    texts: Q strings.
    batch: texts per device call (fixed; the last batch is padded with empty texts).

  Returns:
    (Q, D) float32 L2-normalised: what evaluation computes for the same captions.

  Raises:
    SearchError: the model has no caption tower.
  """
  return encode_in_batches(model_tower_text_encoder(model), texts, batch)
