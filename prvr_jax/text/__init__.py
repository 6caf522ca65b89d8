"""Caption text -> CLIP token ids, offline (below `prvr_jax.data` and `prvr_jax.clip`, which both
tokenise: the loader for a model with its own CLIP text tower, extraction and search for theirs).

  clean.py       the original tokenizer's text cleaning (ftfy + html unescape)
  tokenizer.py   ClipTokenizer on the vendored BPE file (third_party/clip_bpe), CLIP's context length
"""
