"""Offline CLIP tokenizer: transformers' CLIPTokenizer built from the vendored BPE merge list.

Ids equal those of OpenAI's original `clip.tokenize`: the same cleaning runs first
(`clean.clean_text`), transformers' own normaliser is switched off so it cannot clean twice,
and a sequence is [BOS] + up to `max_length - 2` word pieces + [EOS] (truncation keeps EOS), padded
with EOS ids and a 0 attention mask.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import NamedTuple, Optional, Sequence

import numpy as np

from prvr_jax.errors import PrvrError
from prvr_jax.text import clean

DEFAULT_BPE_PATH = (pathlib.Path(__file__).resolve().parents[2] / "third_party" / "clip_bpe" /
                    "bpe_simple_vocab_16e6.txt.gz")
# CLIP's tokenizer context: BOS ... EOS in at most 77 ids (longer texts are truncated, EOS kept).
CLIP_CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# The original keeps the first 49152 - 256 - 2 merges, giving a vocabulary of 49408.
_NUM_MERGES = 49152 - 256 - 2


class TokenizerError(PrvrError, ValueError):
  """The BPE file is missing or not a CLIP merge list; the message names the file."""


class TokenizedText(NamedTuple):
  """A batch of tokenized captions.

  Attributes:
    input_ids: (N, max_length) int32; BOS, pieces, EOS, then EOS ids as padding.
    attention_mask: (N, max_length) int32; 1 on BOS..EOS.
    truncated: (N,) bool; whether word pieces were dropped to fit max_length.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  truncated: np.ndarray


def _byte_symbols() -> list[str]:
  # GPT-2 style byte -> printable character table, in the original's order: printable Latin-1
  # bytes keep their character, the other bytes get characters from U+0100 on.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)]
  others = [b for b in range(256) if b not in printable]
  return [chr(c) for c in printable] + [chr(256 + k) for k in range(len(others))]


def read_bpe(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocabulary and merges of the CLIP BPE, as the original tokenizer derives them.

  Args:
    path: `bpe_simple_vocab_16e6.txt.gz` (first line a header, then one merge 'a b' per line).

  Returns:
    (vocab: token -> id, 49408 entries; merges in rank order).

  Raises:
    TokenizerError: missing or malformed file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise TokenizerError(f"{path}: CLIP BPE file not found")
  try:
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path}: not a gzipped UTF-8 BPE merge list: {e}") from None
  merges = []
  for lineno, line in enumerate(lines[1:_NUM_MERGES + 1], start=2):
    parts = tuple(line.split())
    if len(parts) != 2:
      raise TokenizerError(f"{path}: line {lineno}: expected a merge 'a b', got {line!r}")
    merges.append(parts)
  if len(merges) != _NUM_MERGES:
    raise TokenizerError(f"{path}: {len(merges)} merges, expected at least {_NUM_MERGES}")
  symbols = _byte_symbols()
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  return {t: i for i, t in enumerate(tokens)}, merges


class ClipTokenizer:
  """CLIP tokenizer with the original's ids; no network, no files written.

  Attributes:
    max_length: tokens per sequence including BOS and EOS (77 for CLIP).
    bos_id, eos_id: 49406, 49407.
    vocab_size: 49408.
  """

  def __init__(self, bpe_path: Optional[str | os.PathLike] = None, max_length: int = 77):
    # Here, not at the top: transformers takes 1.4-1.6 s to import, and the loader (every grain
    # worker too) imports this module whether or not it tokenises text.
    from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel

    if max_length < 2:
      raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
    vocab, merges = read_bpe(bpe_path or DEFAULT_BPE_PATH)
    # model_max_length: we truncate ourselves, and a huge limit keeps transformers from warning.
    self._hf = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=1 << 30)
    # The cleaning (clean_text) already did what this normaliser does, and more.
    self._hf.backend_tokenizer.normalizer = None
    self.max_length = max_length
    self.bos_id = vocab[BOS_TOKEN]
    self.eos_id = vocab[EOS_TOKEN]
    self.vocab_size = len(vocab)

  def word_pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text without BOS/EOS and without truncation.

    Args:
      texts: N strings.

    Returns:
      N lists of ids.
    """
    cleaned = [clean.clean_text(t) for t in texts]
    return self._hf(cleaned, add_special_tokens=False)["input_ids"]

  def __call__(self, texts: Sequence[str]) -> TokenizedText:
    """Tokenizes, truncates (keeping EOS) and pads a batch.

    Args:
      texts: N strings.

    Returns:
      TokenizedText with (N, max_length) ids and mask and (N,) truncation flags.
    """
    if isinstance(texts, str):
      raise TypeError("pass a list of strings, not one string")
    n = len(texts)
    ids = np.full((n, self.max_length), self.eos_id, np.int32)
    mask = np.zeros((n, self.max_length), np.int32)
    truncated = np.zeros((n,), bool)
    room = self.max_length - 2
    for i, pieces in enumerate(self.word_pieces(texts)):
      truncated[i] = len(pieces) > room
      seq = [self.bos_id, *pieces[:room], self.eos_id]
      ids[i, :len(seq)] = seq
      mask[i, :len(seq)] = 1
    return TokenizedText(ids, mask, truncated)
