"""CLIP in JAX: flax towers loading Hugging Face checkpoints, and feature extraction from raw
videos and captions (`python -m prvr_jax.extract`). The offline tokenizer is `prvr_jax.text`
(below both this package and `prvr_jax.data`, whose loader tokenises captions too).

  config.py           ClipConfig from a transformers CLIPConfig / config.json
  model.py            text and vision towers (flax linen), ClipEncoders (jitted encoders)
  load.py             local safetensors checkpoint -> params, strictly checked
  preprocess.py       image resize / crop / normalise, as the original CLIP
  video.py            PyAV decoding and fixed-rate frame sampling
  feature_store.py    resumable, crash-safe HDF5 output
  video_features.py   videos -> (T, P) frame embeddings
  text_features.py    captions -> (L, P) token features
  summary.py          the report of an extraction run
"""
