"""The offline CLIP tokenizer gives the original CLIP tokenizer's ids.

Expected ids were produced once by OpenAI's `clip/simple_tokenizer.py` from the clip-anytorch 2.6.0
wheel (the same wheel the vendored BPE file comes from, see third_party/clip_bpe/PROVENANCE.md),
run with ftfy 6.3.1 and regex in a scratch virtualenv: `SimpleTokenizer().encode(text)` (word
pieces, without the start/end tokens).
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from prvr_jax.text.tokenizer import ClipTokenizer, TokenizerError, read_bpe

# (text, original ids).
EXPECTED = [
    ("a man is playing the guitar.", [320, 786, 533, 1629, 518, 5084, 269]),
    ("A Man IS Playing The GUITAR!!!", [320, 786, 533, 1629, 518, 5084, 995]),
    ("She's sure they'll say it's John's, we'd've won... didn't we?",
     [1043, 568, 1650, 889, 1342, 1451, 585, 568, 1742, 568, 267, 649, 1896, 1200, 1749, 678, 2376,
      713, 649, 286]),
    ("SHE'S DON'T I'M YOU'RE WE'VE", [1043, 568, 847, 713, 328, 880, 592, 982, 649, 1200]),
    ("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade; r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
     [15304, 1075, 12138, 614, 267, 1097, 35689, 563, 778, 10067, 1928, 282, 29106, 7054, 4166,
      23176, 10352, 807, 7255, 332]),
    ("Cafe\u0301 decomposed", [15304, 561, 19916]),  # combining accent: NFC first
    ("1st place: 2,500 people in 2024 (3.14%)",
     [272, 545, 1445, 281, 273, 267, 276, 271, 271, 1047, 530, 273, 271, 273, 275, 263, 274, 269,
      272, 275, 16063]),
    ("   lots   of\twhitespace \n and\r\nnewlines   ", [2958, 539, 4699, 2138, 537, 1218, 3418]),
    ("emoji \U0001f600\U0001f44d\U0001f3fd and \u65e5\u672c\u8a9e text, "
     "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
     [16327, 12832, 43722, 537, 39121, 44353, 34002, 508, 4160, 267, 26302, 16370, 29503, 110,
      22176, 141, 480, 38018, 16701, 141, 478]),
    ("U.S.A. state-of-the-art e-mail@x.com #hashtag $5 -- ok?!",
     [340, 269, 338, 269, 320, 269, 1295, 268, 539, 268, 518, 268, 794, 324, 268, 2614, 287, 343,
      269, 2464, 258, 9238, 259, 276, 2432, 2481, 2835]),
    # Below: what transformers' CLIPTokenizer alone gets wrong (ftfy / html cleaning).
    ("Curly \u201cquotes\u201d and don\u2019t \u2018single\u2019",
     [20795, 257, 5808, 257, 537, 847, 713, 568, 17005, 262]),
    ("Tom &amp; Jerry &lt;3 &quot;fun&quot; &#39;x&#39; &amp;amp;",
     [2435, 261, 9164, 283, 274, 257, 1499, 257, 262, 343, 262, 261]),
    ("\ufb01ne \ufb02owers \uff26\uff35\uff2c\uff2c\u3000\uff57\uff49\uff44\uff54\uff48",
     [3797, 4023, 1476, 23571]),  # ligatures, full width
    ("tab\there\x0bvt\x0cff and\u2028ls\u00a0nbsp zero\u200bwidth ctl\x07x",
     [14724, 651, 8424, 339, 1304, 537, 1268, 6459, 4393, 5848, 9844, 23571, 3381, 30789]),
    ("\u0130STANBUL \u039f\u0394\u039f\u03a3 \u03a3\u039f\u03a6\u039f\u03a3",
     [328, 16384, 11231, 138, 123, 138, 112, 138, 123, 139, 480, 139, 225, 138, 123, 139, 228, 138,
      123, 139, 480]),
    ("\u0149 \ufb05 \u0132ssel \u01c5", [262, 333, 129, 123, 339, 7337, 19373, 67, 129, 378]),
    ("caf&EACUTE; &amp;amp;amp; x", [15304, 261, 343]),
    ("a <b> &amp; c", [320, 283, 321, 285, 261, 322]),
    ("\x1b[31mred\x1b[0m text\ufeff", [736, 4160]),
    ("smart\x93quotes\x94", [4115, 257, 5808, 257]),  # C1 controls read as Windows-1252
]
# Needs ftfy's mojibake repair (UTF-8 read as Windows-1252 twice).
MOJIBAKE = ("The Mona Lisa doesn\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2t have eyebrows.",
            [518, 19143, 7424, 2503, 713, 720, 19923, 269])
# "the quick brown fox jumps over the lazy dog" (original ids), for truncation.
FOX = [518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
  return ClipTokenizer()


def test_ids_equal_original_clip(tokenizer):
  texts = [t for t, _ in EXPECTED]
  got = tokenizer.word_pieces(texts)
  for (text, want), ids in zip(EXPECTED, got):
    assert ids == want, f"{text!r}: {ids} != {want}"


def test_mojibake_is_repaired_like_the_original(tokenizer):
  assert tokenizer.word_pieces([MOJIBAKE[0]])[0] == MOJIBAKE[1]


def test_batch_layout_padding_and_truncation(tokenizer):
  long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)  # 108 pieces
  out = tokenizer(["a man is playing the guitar.", "", long_text])
  assert out.input_ids.shape == out.attention_mask.shape == (3, 77)
  assert out.input_ids.dtype == np.int32
  bos, eos = tokenizer.bos_id, tokenizer.eos_id
  assert (bos, eos, tokenizer.vocab_size) == (49406, 49407, 49408)
  np.testing.assert_array_equal(out.input_ids[0, :9], [bos] + EXPECTED[0][1] + [eos])
  np.testing.assert_array_equal(out.input_ids[0, 9:], eos)  # padding
  np.testing.assert_array_equal(out.attention_mask.sum(1), [9, 2, 77])
  np.testing.assert_array_equal(out.input_ids[1, :2], [bos, eos])
  # Truncation keeps EOS last, like clip.tokenize(truncate=True).
  np.testing.assert_array_equal(out.input_ids[2], [bos] + (FOX * 12)[:75] + [eos])
  np.testing.assert_array_equal(out.truncated, [False, False, True])


def test_short_max_length(tmp_path):
  tok = ClipTokenizer(max_length=5)
  out = tok(["a man is playing the guitar."])
  np.testing.assert_array_equal(out.input_ids[0], [49406, 320, 786, 533, 49407])
  assert out.truncated[0]


def test_single_string_rejected(tokenizer):
  with pytest.raises(TypeError, match="list of strings"):
    tokenizer("a man")


def test_vocab_is_the_original_layout():
  vocab, merges = read_bpe(ClipTokenizer.__init__.__globals__["DEFAULT_BPE_PATH"])
  assert len(vocab) == 49408 and len(merges) == 48894
  assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == 49407
  assert vocab["".join(merges[0])] == 512


def test_bad_bpe_files(tmp_path):
  with pytest.raises(TokenizerError, match="not found"):
    ClipTokenizer(bpe_path=tmp_path / "missing.txt.gz")
  plain = tmp_path / "plain.txt.gz"
  plain.write_text("not gzip")
  with pytest.raises(TokenizerError, match="plain.txt.gz: not a gzipped"):
    ClipTokenizer(bpe_path=plain)
  short = tmp_path / "short.txt.gz"
  short.write_bytes(gzip.compress(b"#version: 0.2\na b\nc d\n"))
  with pytest.raises(TokenizerError, match="short.txt.gz: line 4: expected a merge"):
    ClipTokenizer(bpe_path=short)
