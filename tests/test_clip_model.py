"""CLIP towers: parity with transformers' PyTorch CLIPModel, strict checkpoint loading, images."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from prvr_jax.clip import preprocess
from prvr_jax.clip.config import ClipConfigError, config_from_hf, read_config
from prvr_jax.clip.load import (CheckpointError, expected_tensors, load_clip,
                                tensors_from_params)
from prvr_jax.clip.model import ClipEncoders

# Tiny shapes: widths, heads, layers, patch sizes and activations all differ. 'legacy' uses
# eos_token_id 2, whose pooling rule is argmax(input_ids) (EOS = the largest id, 99).
TINY = {
    "quick_gelu": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu"),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24),
    "gelu": dict(
        text=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                  hidden_act="gelu"),
        vision=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                    num_attention_heads=5, image_size=28, patch_size=14, hidden_act="gelu"),
        projection_dim=16),
    "legacy_eos": dict(
        text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                  hidden_act="gelu_pytorch_tanh", eos_token_id=2),
        vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, image_size=16, patch_size=4, hidden_act="quick_gelu"),
        projection_dim=8),
}
_TOKENS = dict(vocab_size=100, max_position_embeddings=12, bos_token_id=98, eos_token_id=99,
               pad_token_id=1)


def hf_config(shape: dict):
  """A transformers CLIPConfig of a tiny shape (vocab 100, BOS 98, EOS 99 unless overridden)."""
  from transformers import CLIPConfig  # pylint: disable=import-outside-toplevel
  return CLIPConfig(text_config={**_TOKENS, **shape["text"]}, vision_config=shape["vision"],
                    projection_dim=shape["projection_dim"])


def write_checkpoint(directory: pathlib.Path, config, seed: int = 0) -> dict[str, np.ndarray]:
  """Writes config.json + model.safetensors of random weights with numpy only; returns them."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config.to_dict()))
  rng = np.random.RandomState(seed)
  tensors = {name: rng.normal(0, 0.1, spec.shape).astype(np.float32)
             for name, spec in expected_tensors(config_from_hf(config)).items()}
  tensors["logit_scale"] = np.array(2.6592, np.float32)
  save_file(tensors, str(directory / "model.safetensors"))
  return tensors


def assert_params_equal(config, params, tensors):
  """params (our tree) hold exactly `tensors` (checkpoint names and layout)."""
  got = tensors_from_params(config, params)
  assert set(got) == set(expected_tensors(config))
  for name, arr in got.items():
    np.testing.assert_array_equal(arr, tensors[name], err_msg=name)


def _text_inputs():
  # Two captions of different lengths, EOS (99) padded like the tokenizer pads.
  ids = np.full((2, 12), 99, np.int32)
  ids[0, :6] = [98, 5, 17, 42, 7, 99]
  ids[1, :3] = [98, 63, 99]
  mask = np.zeros((2, 12), np.int32)
  mask[0, :6] = 1
  mask[1, :3] = 1
  return ids, mask


@pytest.mark.parametrize("name", sorted(TINY))
def test_parity_with_transformers(name, tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import CLIPModel  # pylint: disable=import-outside-toplevel

  config = hf_config(TINY[name])
  torch.manual_seed(0)
  model = CLIPModel(config).eval()
  model.save_pretrained(tmp_path)  # safetensors
  ours, params = load_clip(tmp_path)
  assert ours.text.eos_token_id == (2 if name == "legacy_eos" else 99)  # both pooling rules
  enc = ClipEncoders(ours)
  ids, mask = _text_inputs()
  size = ours.vision.image_size
  images = np.random.RandomState(0).randn(3, size, size, 3).astype(np.float32)
  states, pooled, projected = (np.asarray(a) for a in enc.encode_text(params, ids, mask))
  image_emb = np.asarray(enc.encode_image(params, images))
  with torch.no_grad():
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    text_out = model.text_model(input_ids=t_ids, attention_mask=t_mask)
    ref_proj = model.text_projection(text_out.pooler_output).numpy()
    ref_img = model.visual_projection(
        model.vision_model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).pooler_output)
  valid = mask.astype(bool)
  np.testing.assert_allclose(states[valid], text_out.last_hidden_state.numpy()[valid], atol=1e-5)
  np.testing.assert_allclose(pooled, text_out.pooler_output.numpy(), atol=1e-5)
  np.testing.assert_allclose(projected, ref_proj, atol=1e-5)
  np.testing.assert_allclose(image_emb, ref_img.numpy(), atol=1e-5)
  # Every token through text_projection: the EOS row is the projected (pooled) embedding.
  tokens = np.asarray(enc.project_text_tokens(params, states))
  np.testing.assert_allclose(tokens[0, 5], projected[0], atol=1e-5)


@pytest.mark.parametrize("size", ["B/32", "B/16", "L/14"])
def test_full_size_names_and_shapes_match_transformers(size):
  torch = pytest.importorskip("torch")
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=import-outside-toplevel

  vision = {"B/32": dict(patch_size=32), "B/16": dict(patch_size=16),
            "L/14": dict(patch_size=14, hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16)}[size]
  text = (dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
          if size == "L/14" else {})
  config = CLIPConfig(text_config=text, vision_config=vision,
                      projection_dim=768 if size == "L/14" else 512)
  with torch.device("meta"):  # shapes only, no memory
    state = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
  ours = config_from_hf(config)
  table = expected_tensors(ours)
  assert {k: v.shape for k, v in table.items()} == {k: v for k, v in state.items()
                                                   if k != "logit_scale"}
  # Our flax module has exactly the parameters the table fills.
  abstract = jax.eval_shape(ClipEncoders(ours).init, jax.random.key(0))
  leaves = jax.tree_util.tree_leaves(abstract)
  assert len(leaves) == len(table)
  assert sum(np.prod(x.shape) for x in leaves) == sum(np.prod(s.shape) for s in table.values())


def test_numpy_checkpoint_round_trip_and_sharding(tmp_path):
  config = hf_config(TINY["quick_gelu"])
  tensors = write_checkpoint(tmp_path / "single", config)
  ours, params = load_clip(tmp_path / "single")
  assert_params_equal(ours, params, tensors)
  # The same tensors split over two shards with an index.
  names = sorted(tensors)
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  (shard_dir / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
  weight_map = {}
  for k, part in enumerate((names[::2], names[1::2])):
    fname = f"model-0000{k + 1}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, str(shard_dir / fname))
    weight_map.update({n: fname for n in part})
  (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, sharded = load_clip(shard_dir)
  assert_params_equal(ours, sharded, tensors)
  # One tower only: the other tower's tensors are skipped, and the vision encoder runs.
  _, vision_only = load_clip(tmp_path / "single", towers=("vision",))
  assert set(vision_only["params"]) == {"vision_model", "visual_projection"}
  images = np.zeros((1, 32, 32, 3), np.float32)
  enc = ClipEncoders(ours)
  np.testing.assert_array_equal(enc.encode_image(vision_only, images),
                                enc.encode_image(params, images))


def _edit_checkpoint(directory: pathlib.Path, edit) -> pathlib.Path:
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path))
  return path


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.__setitem__("visual_projection.weight", np.zeros((24, 47), np.float32)),
     r"model.safetensors: tensor 'visual_projection.weight' has shape \(24, 47\), config.json "
     r"implies \(24, 48\)"),
    (lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias"),
     r"missing tensor 'text_model.encoder.layers.1.mlp.fc2.bias'"),
    (lambda t: t.__setitem__("text_model.encoder.layers.2.mlp.fc2.bias", np.zeros(32, np.float32)),
     r"model.safetensors: unexpected tensor 'text_model.encoder.layers.2.mlp.fc2.bias'"),
    (lambda t: t.__setitem__("vision_model.pre_layrnorm.bias", np.full(48, np.nan, np.float32)),
     r"model.safetensors: tensor 'vision_model.pre_layrnorm.bias' contains NaN"),
    (lambda t: t.__setitem__("vision_model.pre_layrnorm.bias", np.zeros(48, np.int32)),
     r"model.safetensors: tensor 'vision_model.pre_layrnorm.bias' has dtype int32"),
])
def test_mismatched_checkpoint_names_tensor_and_file(tmp_path, edit, message):
  write_checkpoint(tmp_path, hf_config(TINY["quick_gelu"]))
  _edit_checkpoint(tmp_path, edit)
  with pytest.raises(CheckpointError, match=message):
    load_clip(tmp_path)


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
  tensors = write_checkpoint(tmp_path, hf_config(TINY["gelu"]))
  _edit_checkpoint(tmp_path, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
  ours, loaded = load_clip(tmp_path)
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(loaded))
  np.testing.assert_allclose(tensors_from_params(ours, loaded)["text_projection.weight"],
                             tensors["text_projection.weight"], atol=1e-3)


def test_bad_directories_and_configs(tmp_path):
  with pytest.raises(CheckpointError, match="directory not found"):
    load_clip(tmp_path / "nope")
  with pytest.raises(ClipConfigError, match="config.json not found"):
    load_clip(tmp_path)
  write_checkpoint(tmp_path / "ok", hf_config(TINY["gelu"]))
  (tmp_path / "ok" / "model.safetensors").rename(tmp_path / "ok" / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="no model.safetensors.*found: config.json, "
                                            "pytorch_model.bin"):
    load_clip(tmp_path / "ok")
  (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x00" * 10)
  with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
    load_clip(tmp_path / "ok")
  bad = json.loads((tmp_path / "ok" / "config.json").read_text())
  bad["vision_config"]["hidden_act"] = "swish"
  (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ClipConfigError, match="vision_config: hidden_act 'swish' is not supported"):
    read_config(tmp_path / "ok")
  (tmp_path / "ok" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ClipConfigError, match="not a CLIPModel config"):
    read_config(tmp_path / "ok")


def test_wrong_image_size_is_rejected(tmp_path):
  write_checkpoint(tmp_path, hf_config(TINY["legacy_eos"]))
  ours, params = load_clip(tmp_path)
  enc = ClipEncoders(ours)
  with pytest.raises(ValueError, match=r"pixel_values must be \(N, 16, 16, 3\)"):
    enc.encode_image(params, np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize("height,width", [(48, 64), (100, 60), (720, 1280), (33, 97), (20, 20)])
def test_preprocess_matches_transformers_clip_image_processor(height, width):
  # The default CLIPImageProcessor needs torchvision; this one is the same steps with Pillow.
  from transformers.models.clip import image_processing_pil_clip  # pylint: disable=import-outside-toplevel

  image = np.random.RandomState(height).randint(0, 256, (height, width, 3)).astype(np.uint8)
  processor = image_processing_pil_clip.CLIPImageProcessorPil(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  ref = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"])
  ours = preprocess.preprocess_images([image], 32)
  assert ours.shape == (1, 32, 32, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-6)


def test_center_crop_rounds_like_torchvision():
  # (35 - 32) / 2 = 1.5 rounds to 2 (torchvision, original CLIP); transformers would floor to 1.
  image = np.arange(35 * 32).reshape(35, 32, 1)
  assert preprocess.center_crop(image, 32)[0, 0, 0] == 2 * 32


def test_bfloat16_towers_give_float32_outputs_close_to_float32(tmp_path):
  """The towers' `dtype`: bfloat16 compute, float32 parameters and outputs, the same embeddings
  to bfloat16 resolution; an unknown dtype is one clear error."""
  write_checkpoint(tmp_path / "clip", hf_config(TINY["quick_gelu"]))
  config, params = load_clip(tmp_path / "clip")
  ids, mask = _text_inputs()
  images = np.random.RandomState(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  f32, bf16 = ClipEncoders(config), ClipEncoders(config, dtype="bfloat16")
  for out, out16 in zip((*f32.encode_text(params, ids, mask), f32.encode_image(params, images)),
                        (*bf16.encode_text(params, ids, mask), bf16.encode_image(params, images))):
    assert out16.dtype == np.float32 and out16.shape == out.shape
    a, b = np.asarray(out).reshape(-1, out.shape[-1]), np.asarray(out16).reshape(-1, out.shape[-1])
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.995, cos.min()
    assert not np.array_equal(a, b)  # it did compute in bfloat16
  # Parameters stay float32.
  assert {l.dtype for l in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  with pytest.raises(ValueError, match="CLIP dtype must be one of"):
    ClipEncoders(config, dtype="float16")
