"""Caption file -> per caption id (L, P) CLIP token features, in the authors' TextData layout.

Each caption's rows are its tokens [BOS] ... [EOS] (EOS last, L <= 77), i.e. the final-LayerNorm
states of the valid tokens. By default every row goes through text_projection ('projected'), so
the EOS row is exactly the caption's CLIP sentence embedding, which the method uses as the TCPL
teacher (../shared/docs/method.md: "the EOS row is the caption's CLIP sentence embedding"); for
CLIP-L/14 both the width and the projection are 768-d, matching the authors' files. 'hidden'
stores the unprojected states instead (width D).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np
import tqdm

from prvr_jax.clip.feature_store import LEGACY_SETTINGS, FeatureStore
from prvr_jax.clip.model import ClipEncoders
from prvr_jax.clip.summary import Summary
from prvr_jax.text.tokenizer import ClipTokenizer
from prvr_jax.clip.video_features import ExtractError
from prvr_jax.data import formats

TEXT_FEATURES = ("projected", "hidden")


def read_captions(path: str | os.PathLike) -> list[formats.CaptionLine]:
  """Reads `<video_id>#enc#<k> <caption text>` lines; any bad line is an error naming it.

  Args:
    path: the caption file.

  Returns:
    The lines in file order.

  Raises:
    ExtractError: missing file, empty caption, duplicate or malformed id (file, id and line).
  """
  issues = formats.Issues(on_error="skip")
  try:
    lines = formats.read_caption_file(path, issues)
  except formats.DataError as e:
    raise ExtractError(str(e)) from None
  if issues.skipped:
    first = issues.skipped[0]
    more = f" (and {len(issues.skipped) - 1} more bad lines)" if len(issues.skipped) > 1 else ""
    raise ExtractError(f"{path}: caption {first['id']!r}: {first['reason'].rsplit(' [', 1)[0]}{more}")
  if not lines:
    raise ExtractError(f"{path}: no captions")
  return lines


def extract_captions(encoders: ClipEncoders, params: Any, tokenizer: ClipTokenizer,
                     captions: str | os.PathLike, out: str | os.PathLike, batch: int = 256,
                     text_features: str = "projected", max_items: Optional[int] = None,
                     info: Optional[dict[str, Any]] = None, progress: bool = True) -> Summary:
  """Writes the token features of every caption of a caption file.

  Args:
    encoders: ClipEncoders of the checkpoint.
    params: its params (the text tower is enough).
    tokenizer: a ClipTokenizer (max_length <= the model's positions).
    captions: the caption file.
    out: the .h5 output; captions already in it are skipped.
    batch: captions per device batch (fixed, so the model compiles once).
    text_features: 'projected' (P-d, EOS row = CLIP text embedding) or 'hidden' (D-d states).
    max_items: only the first this many captions.
    info: extra root attributes for the output.
    progress: show a tqdm bar.

  Returns:
    The Summary; captions longer than the model's 77 tokens are truncated (EOS kept) and counted
    in its notes.
  """
  if text_features not in TEXT_FEATURES:
    raise ExtractError(f"--text-features must be one of {TEXT_FEATURES}, got {text_features!r}")
  if batch <= 0:
    raise ExtractError(f"--batch must be > 0, got {batch}")
  if tokenizer.max_length > encoders.config.text.max_positions:
    raise ExtractError(f"tokenizer max_length {tokenizer.max_length} exceeds the model's "
                       f"{encoders.config.text.max_positions} positions")
  lines = read_captions(captions)[:max_items]
  settings = {"kind": "clip_caption_features", "text_features": text_features,
              "clip_config": dataclasses.asdict(encoders.config), "clip_dtype": encoders.dtype}
  store = FeatureStore(out, settings, info, assumed=LEGACY_SETTINGS)
  summary = Summary(kind="captions", out=str(out), listed=len(lines))
  todo = [c for c in lines if c.caption_id not in store]
  summary.skipped_existing = len(lines) - len(todo)
  truncated = []
  bar = tqdm.tqdm(total=len(todo), desc="captions", unit="caption", disable=not progress)
  for start in range(0, len(todo), batch):
    chunk = todo[start:start + batch]
    # Pad the batch with empty captions so every call has one shape.
    tok = tokenizer([c.text for c in chunk] + [""] * (batch - len(chunk)))
    states, _, _ = encoders.encode_text(params, tok.input_ids, tok.attention_mask)
    if text_features == "projected":
      states = encoders.project_text_tokens(params, states)
    states = np.asarray(states)
    items = []
    for i, c in enumerate(chunk):
      n = int(tok.attention_mask[i].sum())
      if tok.truncated[i]:
        truncated.append(c.caption_id)
      items.append((c.caption_id, states[i, :n],
                    {"num_tokens": n, "truncated": int(tok.truncated[i]), "line": c.line}))
    store.put(items)
    summary.done += len(items)
    bar.update(len(chunk))
  bar.close()
  if truncated:
    summary.notes.append(f"{len(truncated)} captions longer than {tokenizer.max_length} tokens were "
                         f"truncated (EOS kept), e.g. {truncated[0]!r}")
  summary.total_in_output = store.finalize()
  return summary
