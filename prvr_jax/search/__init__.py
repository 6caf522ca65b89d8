"""Text-to-moment search over your own videos with a trained MSC model.

  python -m prvr_jax.search index --workdir RUN --features videos.h5 --out INDEX
  python -m prvr_jax.search query --index INDEX --clip CLIP_DIR "a man holds a dog" [--mode ann]
  python -m prvr_jax.search add|remove|compact|retrain --index INDEX ...

Modules (one job each):
  features.py     reads the video / caption feature files that `python -m prvr_jax.extract` writes.
  model.py        the trained network a search uses (restored from a workdir) and its identity.
  token_store.py  one segment of memory-mapped token arrays (float16 / float32 / int8 + scales).
  index_store.py  the on-disk index: segments, ANN files, a manifest written last; reading it.
  index.py        builds an index: every video encoded once, in fixed-size padded chunks.
  ann.py          ANN candidates per branch (FAISS): token hits -> per-video maxima.
  milvus.py       the same candidates from Milvus collections (pymilvus; milvus-lite in process).
  backends.py     opens the ANN backend an index's manifest names.
  query.py        exact scan, or ANN candidates re-scored exactly; the top-k and the moments.
  maintain.py     add / remove / compact / retrain, each atomic.
  bench_search.py `python -m prvr_jax.bench search`: exact vs ANN at collection scale.
  text.py         raw text -> query vectors through a frozen CLIP text tower (in the same jit).
  cli.py          the command line (`python -m prvr_jax.search`).

See the README section "Search your own videos" for the walk-through from raw videos to results.
"""
