"""TFDS builders of the PRVR benchmarks (ArrayRecord), and the factory the config uses.

  builder = factory.make_builder(data, data_dir)   # data: a DataConfig; data_dir: the TFDS dir
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))

Modules: records.py (the stored example, numpy only), base.py (shared builder), collection.py
(reading and validating the authors' layout), benchmarks.py (TVR, ActivityNet, Charades,
QVHighlights), synthetic_benchmark.py, factory.py (`make_builder`).
"""
