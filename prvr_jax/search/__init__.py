"""Text-to-moment search over your own videos with a trained MSC model.

  python -m prvr_jax.search index --workdir RUN --features videos.h5 --out INDEX
  python -m prvr_jax.search query --index INDEX --clip CLIP_DIR "a man holds a dog"

Modules (one job each):
  features.py     reads the video / caption feature files that `python -m prvr_jax.extract` writes.
  model.py        the trained network a search uses (restored from a workdir) and its identity.
  index_store.py  the on-disk index: chunk files + a manifest written last; reading it back.
  index.py        builds an index: every video encoded once, in fixed-size padded chunks.
  query.py        encodes queries and streams the index chunk by chunk, keeping a running top-k.
  text.py         raw text -> query vectors through a frozen CLIP text tower (in the same jit).
  cli.py          the command line (`python -m prvr_jax.search`).

See the README section "Search your own videos" for the walk-through from raw videos to results.
"""
