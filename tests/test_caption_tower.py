"""The in-model CLIP text tower (config.text_tower): raw caption text -> query encoder -> TCPL teacher.

A tiny 2-block CLIP with the real vocabulary is written by the test; the model is a tiny MSCNet
whose query width is the CLIP projection (P = 8).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from prvr_jax import extract
from prvr_jax.clip.load import load_clip
from prvr_jax.text.tokenizer import ClipTokenizer
from prvr_jax.data import pipeline
from prvr_jax.data.config import DataConfig
from prvr_jax.models import caption_tower as ct
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.msc import MSCNet, init_params
from prvr_jax.search.features import read_caption_features
from prvr_jax.train.optim import make_optimizer
from tests.test_clip_model import write_checkpoint

P, HIDDEN = 8, 16
TEXTS = ("A man holds a brown dog.", "someone opens the door slowly, then sits down on a chair",
         "cup")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> pathlib.Path:
  """A 2-block CLIP with the real vocabulary size (the tokenizer's ids must fit)."""
  from transformers import CLIPConfig  # pylint: disable=import-outside-toplevel

  config = CLIPConfig(
      text_config=dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=16),
      projection_dim=P)
  directory = tmp_path_factory.mktemp("clip2")
  write_checkpoint(directory, config, seed=3)
  return directory


def tower_config(clip_dir, features="projected", trainable_blocks=0, max_tokens=77,
                 keep_eos=False) -> ct.CaptionTowerConfig:
  clip_config, _ = load_clip(clip_dir, towers=("text",))
  return ct.CaptionTowerConfig(text=clip_config.text, projection_dim=clip_config.projection_dim,
                               features=features, trainable_blocks=trainable_blocks,
                               max_query_tokens=max_tokens, truncate_keep_eos=keep_eos,
                               source=str(clip_dir))


def model_config(tower: ct.CaptionTowerConfig | None, width: int = P) -> ModelConfig:
  return ModelConfig(hidden_size=32, num_heads=2, visual_input_size=8, query_input_size=width,
                     dropout=0.1, input_dropout=0.1, gauss_widths=(0.5,), caption_tower=tower)


def params_with_tower(cfg: ModelConfig, clip_dir) -> dict:
  params = dict(init_params(cfg, jax.random.key(0)))
  params[ct.PARAMS_KEY] = ct.load_tower_params(clip_dir, cfg.caption_tower)
  return params


def tokenized(texts, tower: ct.CaptionTowerConfig | None = None):
  """Token ids as the loader gives them to a model with `tower` (default: all 77)."""
  length = tower.token_length if tower is not None else 77
  ids, mask = pipeline.CaptionTokenizer(length)(list(texts), len(texts))
  return dict(caption_ids=ids, caption_id_mask=mask)


@pytest.fixture(scope="module")
def extracted(clip_dir, tmp_path_factory) -> dict[str, list[np.ndarray]]:
  """What `python -m prvr_jax.extract captions` writes for TEXTS, projected and hidden."""
  directory = tmp_path_factory.mktemp("captions")
  captions = directory / "q.caption.txt"
  captions.write_text("".join(f"v#enc#{i} {t}\n" for i, t in enumerate(TEXTS)))
  out = {}
  for kind in ("projected", "hidden"):
    feats = directory / f"{kind}.h5"
    assert extract.main(["captions", "--clip", str(clip_dir), "--captions", str(captions),
                         "--out", str(feats), "--text-features", kind, "--quiet"]) == 0
    out[kind] = [r for _, r in read_caption_features(feats, [f"v#enc#{i}" for i in range(len(TEXTS))])]
  return out


# ----------------------------------------------------------------------------------------------
# Frozen tower == extracted features.


@pytest.mark.parametrize("features,max_tokens,keep_eos", [
    ("projected", 77, False), ("projected", 5, True), ("projected", 5, False), ("hidden", 77, False)])
def test_frozen_tower_equals_extracted_token_features(clip_dir, extracted, features, max_tokens,
                                                      keep_eos):
  """The model's query side from raw text = from the extracted features, pooled query and teacher."""
  tower = tower_config(clip_dir, features, 0, max_tokens, keep_eos)
  width = P if features == "projected" else HIDDEN
  with_tower = model_config(tower, width)
  params = params_with_tower(with_tower, clip_dir)
  inputs = tokenized(TEXTS, tower)
  assert inputs["caption_ids"].shape[1] == (77 if keep_eos else max_tokens)
  from_text, teacher_text = MSCNet(with_tower).apply(
      {"params": params}, inputs, method=MSCNet.encode_captions)

  rows = extracted[features]
  feat, mask = pipeline._pad_captions(rows, len(rows), max_tokens, width, keep_eos)  # the loader
  plain = dataclasses.replace(with_tower, caption_tower=None)
  plain_params = {k: v for k, v in params.items() if k != ct.PARAMS_KEY}
  from_file, teacher_file = MSCNet(plain).apply(
      {"params": plain_params}, dict(text_feat=feat, text_mask=mask), method=MSCNet.encode_captions)

  np.testing.assert_allclose(from_text, from_file, atol=2e-5)
  np.testing.assert_allclose(teacher_text, teacher_file, atol=2e-6)
  assert np.abs(np.asarray(from_text[0] - from_text[1])).max() > 1e-3  # not a constant
  if max_tokens == 5:  # the second caption is truncated, its teacher row is its 5th kept row
    last = feat[1, 4] if not keep_eos else pipeline.l2_normalize(rows[1][-1:])[0]
    np.testing.assert_allclose(teacher_file[1], last, atol=1e-6)


@pytest.mark.parametrize("trainable_blocks", [0, 1])
def test_bfloat16_tower_gives_float32_rows_close_to_float32(clip_dir, trainable_blocks):
  """`text_tower.dtype = bfloat16`: the same query features and teacher to bfloat16 resolution,
  float32 out (the query encoder and TCPL see float32 either way)."""
  tower = tower_config(clip_dir, "projected", trainable_blocks)
  inputs = tokenized(TEXTS, tower)
  outs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = model_config(dataclasses.replace(tower, dtype=dtype))
    params = params_with_tower(cfg, clip_dir)
    rows, teacher = MSCNet(cfg).apply({"params": params}, inputs, method=MSCNet.encode_captions)
    tower_rows = ct.CaptionTower(cfg.caption_tower).apply(
        {"params": params[ct.PARAMS_KEY]}, inputs["caption_ids"], inputs["caption_id_mask"])
    assert all(np.asarray(a).dtype == np.float32 for a in (rows, teacher, *tower_rows))
    outs[dtype] = [np.asarray(a) for a in (rows, teacher, *tower_rows)]
  for a, b in zip(outs["float32"], outs["bfloat16"]):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    keep = np.linalg.norm(a, axis=-1) > 0  # padded rows are zero in both
    cos = np.sum(a * b, -1)[keep] / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))[keep]
    assert cos.min() > 0.99, cos.min()
    assert not np.array_equal(a, b)


def test_frozen_tower_has_no_gradient_and_no_update(clip_dir):
  tower = tower_config(clip_dir)
  cfg = model_config(tower)
  params = params_with_tower(cfg, clip_dir)

  def loss(p):
    pooled, teacher = MSCNet(cfg).apply({"params": p}, tokenized(TEXTS),
                                        method=MSCNet.encode_captions)
    return jnp.sum(pooled ** 2) + jnp.sum(pooled[:, :P] * teacher)

  grads = jax.grad(loss)(params)
  tower_grads = jax.tree.leaves(grads[ct.PARAMS_KEY])
  assert tower_grads and all(float(jnp.abs(g).max()) == 0.0 for g in tower_grads)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["query_input_proj"])) > 0
  # A step with weight decay and non-zero "gradients" everywhere leaves the tower untouched.
  opt = make_optimizer("bert_adam", 1e-2, caption_tower=tower)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = opt.update(ones, opt.init(params), params)
  new = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(params[ct.PARAMS_KEY]), jax.tree.leaves(new[ct.PARAMS_KEY])):
    np.testing.assert_array_equal(a, b)
  assert all(float(jnp.abs(a - b).max()) > 0
             for a, b in zip(jax.tree.leaves(new["query_pool"]), jax.tree.leaves(params["query_pool"])))


# ----------------------------------------------------------------------------------------------
# Last N blocks trainable.


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_trainable_blocks_train_only_the_top_and_keep_the_frozen_teacher(clip_dir):
  tower = tower_config(clip_dir, trainable_blocks=1)
  cfg = model_config(tower)
  params = params_with_tower(cfg, clip_dir)
  net = MSCNet(cfg)
  frozen = model_config(tower_config(clip_dir))
  frozen_params = params_with_tower(frozen, clip_dir)
  inputs = tokenized(TEXTS)

  # At initialisation the student equals the frozen model, and the teacher is CLIP's.
  pooled, teacher = net.apply({"params": params}, inputs, method=MSCNet.encode_captions)
  want_pooled, want_teacher = MSCNet(frozen).apply({"params": frozen_params}, inputs,
                                                   method=MSCNet.encode_captions)
  np.testing.assert_allclose(pooled, want_pooled, atol=1e-6)
  np.testing.assert_allclose(teacher, want_teacher, atol=1e-6)

  def loss(p):
    pooled, teacher = net.apply({"params": p}, inputs, method=MSCNet.encode_captions)
    return jnp.sum(pooled ** 2) + jnp.sum(pooled[:, :P] * teacher)

  grads = _flat(jax.grad(loss)(params)[ct.PARAMS_KEY])
  trained = {k for k, g in grads.items() if np.abs(g).max() > 0}
  labels = _flat(ct.trainable_labels({ct.PARAMS_KEY: params[ct.PARAMS_KEY]}, tower)[ct.PARAMS_KEY])
  assert trained and trained == {k for k, v in labels.items() if v == "train"}
  assert all(k[:3] == ("text_model", "encoder", "layers_1") or k[:2] == ("text_model", "final_layer_norm")
             or k[0] == "text_projection" for k in trained)
  assert not any(k[0] == "frozen_top" or "layers_0" in k or "token_embedding" in k for k in trained)

  # Training the top moves the student but not the teacher.
  moved = dict(params)
  moved[ct.PARAMS_KEY] = jax.tree.map(lambda x: x, params[ct.PARAMS_KEY])
  moved[ct.PARAMS_KEY]["text_model"]["encoder"]["layers_1"] = jax.tree.map(
      lambda x: x + 0.05, params[ct.PARAMS_KEY]["text_model"]["encoder"]["layers_1"])
  pooled2, teacher2 = net.apply({"params": moved}, inputs, method=MSCNet.encode_captions)
  np.testing.assert_array_equal(teacher2, teacher)
  assert np.abs(np.asarray(pooled2 - pooled)).max() > 1e-4

  opt = make_optimizer("bert_adam", 1e-2, caption_tower=tower)
  updates, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
  new = _flat(optax.apply_updates(params, updates)[ct.PARAMS_KEY])
  old = _flat(params[ct.PARAMS_KEY])
  changed = {k for k in old if np.abs(new[k] - old[k]).max() > 0}
  assert changed == {k for k, v in labels.items() if v == "train"}


def test_config_errors_name_the_setting(clip_dir):
  with pytest.raises(ValueError, match=r"trainable_blocks=3 must be in \[0, 2\]"):
    tower_config(clip_dir, trainable_blocks=3)
  with pytest.raises(ValueError, match=r"features must be one of"):
    tower_config(clip_dir, features="pooled")
  with pytest.raises(ValueError, match=r"text_tower.dtype must be one of \['bfloat16', 'float32'\]"):
    dataclasses.replace(tower_config(clip_dir), dtype="float16")
  from prvr_jax.train.config import TextTowerConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"text_tower.dtype must be one of"):
    TextTowerConfig(dtype="half")
  with pytest.raises(ValueError, match=r"query_input_size=16 but the CLIP text tower .* gives 8-d"):
    model_config(tower_config(clip_dir), width=16)
  cfg = model_config(tower_config(clip_dir))
  with pytest.raises(ValueError, match="inputs need caption_ids"):
    MSCNet(cfg).apply({"params": params_with_tower(cfg, clip_dir)},
                      dict(text_feat=jnp.zeros((1, 4, P)), text_mask=jnp.ones((1, 4))),
                      method=MSCNet.encode_captions)
  other = dataclasses.replace(cfg.caption_tower, projection_dim=4)
  with pytest.raises(ValueError, match="is not the one this run was built with"):
    ct.load_tower_params(clip_dir, other)
  assert ct.CaptionTowerConfig.from_dict(json.loads(json.dumps(cfg.caption_tower.to_dict()))) == \
      cfg.caption_tower
  # A caption_tower.json written before the dtype existed reads as float32.
  old = cfg.caption_tower.to_dict()
  del old["dtype"]
  assert ct.CaptionTowerConfig.from_dict(old).dtype == "float32"


# ----------------------------------------------------------------------------------------------
# The loader tokenises caption text.


def test_loader_gives_tokenised_caption_text(tmp_path):
  from prvr_jax.data.prepare import prepare  # pylint: disable=import-outside-toplevel
  from tests.train_helpers import tiny_config  # pylint: disable=import-outside-toplevel

  data = DataConfig.from_config_dict(tiny_config().data)
  prepare(data, str(tmp_path))
  dataset_dir = pipeline.dataset_dir_from_config(data, str(tmp_path))
  ds = pipeline.train_dataset(dataset_dir, batch_size=8, max_captions_per_video=6,
                              caption_text_length=20, shuffle=False)
  batch = ds[0]
  assert "text_feat" not in batch and batch["caption_ids"].shape == (48, 20)
  arrays, _ = pipeline.split_batch(batch)
  assert set(arrays) == set(pipeline.TRAIN_TEXT_KEYS)
  source = pipeline.RecordSource(dataset_dir, "train")
  tokenizer = ClipTokenizer(max_length=77)  # the first 20 ids of CLIP's 77 (the tower is causal)
  for v in range(8):
    texts = [t.decode() for t in source[v]["caption_texts"]]
    want = tokenizer(texts)
    rows = slice(6 * v, 6 * v + len(texts))
    np.testing.assert_array_equal(batch["caption_ids"][rows], want.input_ids[:, :20])
    np.testing.assert_array_equal(batch["caption_id_mask"][rows], want.attention_mask[:, :20])
    padding = slice(6 * v + len(texts), 6 * v + 6)
    assert batch["query_valid"][rows].all() and not batch["query_valid"][padding].any()
    assert not batch["caption_id_mask"][padding].any()
  queries = pipeline.eval_query_dataset(dataset_dir, "val", batch_size=8, caption_text_length=20)[0]
  first = [t.decode() for t in pipeline.RecordSource(dataset_dir, "val")[0]["caption_texts"]][0]
  np.testing.assert_array_equal(queries["caption_ids"][0], tokenizer([first]).input_ids[0, :20])
  long_text = " ".join(["word"] * 100)  # 100 pieces: truncated, cut without its EOS
  ids, mask = pipeline.CaptionTokenizer(20)([long_text], 2)
  np.testing.assert_array_equal(ids[0], tokenizer([long_text]).input_ids[0, :20])
  assert mask[0].all() and not mask[1].any()


# ----------------------------------------------------------------------------------------------
# End to end: train with the tower, evaluate, search with raw text and no CLIP directory.


@pytest.mark.slow
def test_training_with_a_trainable_tower_then_search(clip_dir, tmp_path, capsys):
  # pylint: disable=import-outside-toplevel
  import h5py

  from prvr_jax.search import cli
  from prvr_jax.run import load_trained
  from prvr_jax.train.loop import train_and_evaluate
  from tests.train_helpers import tiny_config

  config = tiny_config()
  config.text_tower.clip_dir = str(clip_dir)
  config.text_tower.trainable_blocks = 1
  config.train.max_steps = 3
  config.train.log_every = 1
  config.eval.diagnostics = False
  run = tmp_path / "run"
  summary = train_and_evaluate(config, str(run), progress=False)
  assert summary["step"] == 3
  assert json.loads((run / "config.json").read_text())["model"]["query_input_size"] == P
  assert (run / ct.WORKDIR_FILE).is_file()
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(l["loss"]) and l["tcpl"] > 0 for l in lines if "split" not in l)
  assert 0 <= json.loads((run / "eval_test.json").read_text())["SumR"] <= 600

  # Resuming with another tower setting is refused, naming the file and the setting.
  config.text_tower.trainable_blocks = 2
  with pytest.raises(ValueError, match=r"caption_tower.json: .* text_tower.trainable_blocks=2 \(the run "
                                       r"has 1\)"):
    train_and_evaluate(config, str(run), progress=False)

  # Restored without the CLIP directory: frozen parts and the teacher copy are CLIP's weights,
  # the trained top moved.
  (clip_dir / "model.safetensors").rename(clip_dir / "away.safetensors")
  try:
    trained, params, step = load_trained(str(run), "latest")
  finally:
    (clip_dir / "away.safetensors").rename(clip_dir / "model.safetensors")
  assert step == 3 and trained.model.caption_tower.trainable_blocks == 1
  clip = ct.tower_params_from_clip(load_clip(clip_dir, towers=("text",))[1],
                                   trained.model.caption_tower)
  got, want = _flat(jax.device_get(params[ct.PARAMS_KEY])), _flat(clip)
  labels = _flat(ct.trainable_labels({ct.PARAMS_KEY: clip}, trained.model.caption_tower)[ct.PARAMS_KEY])
  for k, v in want.items():
    if labels[k] == "freeze":
      np.testing.assert_array_equal(got[k], v, err_msg=str(k))
    assert labels[k] == "freeze" or np.abs(got[k] - v).max() > 0, k

  # Search: videos indexed with the run, queries as plain text through the model's own tower.
  feats = tmp_path / "videos.h5"
  rng = np.random.RandomState(0)
  with h5py.File(feats, "w") as f:
    for i in range(3):
      ds = f.create_dataset(f"v{i}", data=rng.randn(20 + 10 * i, 64).astype(np.float32))
      ds.attrs["duration"], ds.attrs["fps"] = (20 + 10 * i) / 2.0, 2.0
  index = tmp_path / "index"
  assert cli.main(["index", "--workdir", str(run), "--features", str(feats), "--out", str(index),
                   "--which", "latest", "--quiet"]) == 0
  capsys.readouterr()
  assert cli.main(["query", "--index", str(index), "a person holds a red cup", "--top-k", "2"]) == 0
  hits = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [h["rank"] for h in hits] == [1, 2] and hits[0]["score"] >= hits[1]["score"]
  assert cli.main(["query", "--index", str(index), "--clip", str(clip_dir), "a cup"]) == 2
  assert "runs its own CLIP text tower" in capsys.readouterr().err


def test_resumed_run_may_change_the_tower_dtype_but_not_its_shape(clip_dir, tmp_path, caplog):
  import logging  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel

  from prvr_jax.run import resolve_caption_tower  # pylint: disable=import-outside-toplevel
  from prvr_jax.train.config import TextTowerConfig  # pylint: disable=import-outside-toplevel

  ct.write_to_workdir(tower_config(clip_dir), tmp_path)
  sections = types.SimpleNamespace(text_tower=TextTowerConfig(clip_dir=str(clip_dir), dtype="bfloat16"))
  with caplog.at_level(logging.INFO):
    kept = resolve_caption_tower(sections, None, str(tmp_path))
  assert kept.dtype == "bfloat16" and kept.text == tower_config(clip_dir).text
  assert "text_tower.dtype is bfloat16 (the run so far used float32)" in caplog.text
  sections.text_tower = TextTowerConfig(clip_dir=str(clip_dir), features="hidden")
  with pytest.raises(ValueError, match="another caption tower: text_tower.features='hidden'"):
    resolve_caption_tower(sections, None, str(tmp_path))
