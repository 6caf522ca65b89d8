"""The text cleaning OpenAI's CLIP tokenizer applies before BPE, so our token ids equal its ids.

The original runs `ftfy.fix_text`, `html.unescape` twice, collapses whitespace (the `regex` module's
`\\s`) and lower-cases. transformers' CLIPTokenizer does only NFC + whitespace + lower-case, so
curly quotes, HTML entities, ligatures, full-width letters, control characters and mis-encoded text
would get other ids without this step.
"""

from __future__ import annotations

import html

import ftfy
import regex

_WHITESPACE = regex.compile(r"\s+")


def clean_text(text: str) -> str:
  """CLIP's cleaning: fix text, unescape HTML twice, collapse whitespace, strip, lower-case.

  Args:
    text: a caption.

  Returns:
    The string the original tokenizer splits into words.
  """
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE.sub(" ", text).strip().lower()
