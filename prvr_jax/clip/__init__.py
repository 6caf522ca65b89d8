"""CLIP in JAX: flax towers loading Hugging Face checkpoints, an offline tokenizer, and feature
extraction from raw videos and captions (`python -m prvr_jax.extract`).

  config.py           ClipConfig from a transformers CLIPConfig / config.json
  model.py            text and vision towers (flax linen), ClipEncoders (jitted encoders)
  load.py             local safetensors checkpoint -> params, strictly checked
  text_clean.py       the original tokenizer's text cleaning (ftfy + html unescape)
  tokenizer.py        ClipTokenizer on the vendored BPE file (third_party/clip_bpe)
  preprocess.py       image resize / crop / normalise, as the original CLIP
  video.py            PyAV decoding and fixed-rate frame sampling
  feature_store.py    resumable, crash-safe HDF5 output
  video_features.py   videos -> (T, P) frame embeddings
  text_features.py    captions -> (L, P) token features
  summary.py          the report of an extraction run
"""
