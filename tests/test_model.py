"""The network against the golden file (fed the golden batch), and the torch converter."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util

from prvr_jax.convert import state_dict, torch_msc
from prvr_jax.models.config import ModelConfig
from prvr_jax.models.layers import gaussian_prior
from prvr_jax.models.msc import MSCNet, init_params, last_token_features

FEAT_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def converted(golden):
  return state_dict.convert(state_dict.golden_state_dict(golden), num_heads=4, sft_factor=0.09)


@pytest.fixture(scope="module")
def forward(golden, converted):
  cfg, params = converted
  batch = {k[len("batch/"):]: jnp.asarray(v) for k, v in golden.items() if k.startswith("batch/")}
  apply = jax.jit(lambda p, b: MSCNet(cfg).apply({"params": p}, b, capture_intermediates=True,
                                                 mutable=["intermediates"]))
  out, state = apply(params, batch)
  return batch, out, traverse_util.flatten_dict(state["intermediates"], sep="/")


def test_config_inferred_from_state_dict(converted):
  cfg, _ = converted
  assert (cfg.hidden_size, cfg.visual_input_size, cfg.query_input_size) == (64, 96, 96)
  assert (cfg.max_desc_len, cfg.max_ctx_len, cfg.num_clips, cfg.num_frames) == (77, 128, 32, 128)


@pytest.mark.parametrize("name", ["video_query", "encoded_query", "clip_scale_scores", "clip_scale_scores_",
                                  "frame_scale_scores", "frame_scale_scores_", "encoded_clip_feat",
                                  "encoded_frame_feat"])
def test_outputs_match_golden(golden, forward, name):
  _, out, _ = forward
  np.testing.assert_allclose(out[name], golden[f"out/{name}"], **FEAT_TOL)


@pytest.mark.parametrize("ref,ours", [
    ("dbg/clip_input_proj", "clip_input_proj/__call__"), ("dbg/clip_pos_embed", "clip_pos_embed/__call__"),
    ("dbg/frame_pos_embed", "frame_pos_embed/__call__"), ("dbg/query_input_proj", "query_input_proj/__call__"),
    ("dbg/query_pos_embed", "query_pos_embed/__call__"), ("dbg/query_encoder", "query_encoder/__call__"),
    ("dbg/clip_encoder", "clip_encoder/__call__"), ("dbg/frame_encoder_1", "frame_encoder/__call__"),
    ("dbg/clip_encoder.mix_logits", "clip_encoder/mix_logits"),
    ("dbg/frame_encoder_1.mix_logits", "frame_encoder/mix_logits"),
])
def test_intermediates_match_golden(golden, forward, ref, ours):
  _, _, inter = forward
  np.testing.assert_allclose(inter[ours][0], golden[ref], **FEAT_TOL)


def test_branch_outputs_match_golden(golden, forward):
  _, _, inter = forward
  np.testing.assert_allclose(np.moveaxis(inter["clip_encoder/branch_out"][0], 1, 0),
                             golden["dbg/clip_encoder.branch_out"], **FEAT_TOL)
  np.testing.assert_allclose(inter["frame_encoder/branch_out"][0][:, 0],
                             golden["dbg/frame_encoder_1.branch0_out"], **FEAT_TOL)


def test_clip_query_is_eos_input_token(golden, forward):
  batch, _, _ = forward
  np.testing.assert_array_equal(last_token_features(batch["text_feat"], batch["text_mask"]),
                                golden["out/clip_query"])


def test_gaussian_priors_match_golden(golden):
  for i, width in enumerate((0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)):
    np.testing.assert_allclose(gaussian_prior(32, width), golden["dbg/gauss_32"][i], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gaussian_prior(128, 0.5), golden["dbg/gauss_128_w0.5"], atol=1e-5, rtol=1e-5)
  assert np.allclose(gaussian_prior(32, 5.0).max(axis=1), 1.0)


def test_factorised_mixer_equals_plain_cross_attention(converted, forward):
  """The weight-token attention computed the cheap way equals projecting every token."""
  cfg, params = converted
  _, _, inter = forward
  branches = inter["clip_encoder/branch_out"][0]  # (B, K, L, D)
  p = params["clip_encoder"]["mixer_attention"]
  token = params["weight_token"]
  heads, dh = cfg.num_heads, cfg.hidden_size // cfg.num_heads
  q = (token @ p["query"]["kernel"] + p["query"]["bias"]).reshape(heads, dh)
  k = (branches @ p["key"]["kernel"] + p["key"]["bias"]).reshape(branches.shape[:3] + (heads, dh))
  v = (branches @ p["value"]["kernel"] + p["value"]["bias"]).reshape(branches.shape[:3] + (heads, dh))
  probs = jax.nn.softmax(jnp.einsum("hd,nklhd->nkhl", q, k) / np.sqrt(dh), axis=-1)
  ctx = jnp.einsum("nkhl,nklhd->nkhd", probs, v).reshape(branches.shape[:2] + (cfg.hidden_size,))
  from prvr_jax.models.gmm_block import WeightTokenAttention  # pylint: disable=import-outside-toplevel
  factorised = WeightTokenAttention(cfg.num_heads, 0.0).apply({"params": p}, token, branches, None, True)
  # The same residual / LayerNorm / FFN tail applied to the plainly computed context.
  norm = lambda x, s: ((x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
                       * s["scale"] + s["bias"])
  x = norm(token + ctx, p["norm1"])
  h = jax.nn.relu(x @ p["ffn"]["layer1"]["kernel"] + p["ffn"]["layer1"]["bias"])
  plain = norm(x + h @ p["ffn"]["layer2"]["kernel"] + p["ffn"]["layer2"]["bias"], p["norm2"])
  np.testing.assert_allclose(factorised, plain, atol=2e-5, rtol=1e-4)


def test_dropout_is_keyed_and_off_when_deterministic(converted, forward):
  cfg, params = converted
  batch, out, _ = forward
  run = jax.jit(lambda k, det: MSCNet(cfg).apply(
      {"params": params}, batch["text_feat"], batch["text_mask"], det, rngs={"dropout": k},
      method=MSCNet.encode_query)[0], static_argnums=1)
  a, b, c = run(jax.random.key(1), False), run(jax.random.key(1), False), run(jax.random.key(2), False)
  a, b, c = dict(video_query=a), dict(video_query=b), dict(video_query=c)
  np.testing.assert_allclose(run(jax.random.key(1), True), out["video_query"], atol=1e-5)
  np.testing.assert_array_equal(a["video_query"], b["video_query"])
  assert np.abs(np.asarray(a["video_query"] - c["video_query"])).max() > 1e-3
  assert np.abs(np.asarray(a["video_query"] - out["video_query"])).max() > 1e-3


def test_converter_roundtrip_other_shapes():
  cfg = ModelConfig(hidden_size=48, num_heads=3, visual_input_size=20, query_input_size=12,
                    max_desc_len=30, max_ctx_len=64, num_clips=8, num_frames=64, sft_factor=0.5)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(3)))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  sd = state_dict.params_to_torch_names(params)
  assert sd["weight_token"].shape == (1, 1, 48)
  assert sd["frame_encoder_1.attn7.self.query.weight"].shape == (48, 48)
  assert sd["modular_vector_mapping.weight"].shape == (1, 48)
  cfg2, params2 = state_dict.convert(sd, num_heads=3, sft_factor=0.5)
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def _golden_sd(golden):
  return state_dict.golden_state_dict(golden)


def test_converter_rejects_missing_parameter(golden):
  sd = _golden_sd(golden)
  del sd["clip_encoder.attn3.norm2.bias"]
  with pytest.raises(state_dict.ConversionError, match="lacks 1 parameters"):
    state_dict.convert(sd)


def test_converter_rejects_wrong_shape_naming_key(golden):
  sd = _golden_sd(golden)
  sd["vproj_clip.bias"] = np.zeros((65,), np.float32)
  with pytest.raises(state_dict.ConversionError, match="vproj_clip.bias"):
    state_dict.convert(sd)


def test_converter_rejects_unknown_and_nan(golden):
  sd = _golden_sd(golden)
  sd["extra_head.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(state_dict.ConversionError, match="extra_head.weight"):
    state_dict.convert(sd)
  sd = _golden_sd(golden)
  sd["query_encoder.self.key.weight"] = sd["query_encoder.self.key.weight"].copy()
  sd["query_encoder.self.key.weight"][0, 0] = np.nan
  with pytest.raises(state_dict.ConversionError, match="query_encoder.self.key.weight.*NaN"):
    state_dict.convert(sd)


def test_reads_authors_checkpoint_file(golden, tmp_path):
  torch = pytest.importorskip("torch")
  sd = {k: torch.from_numpy(v.copy()) for k, v in _golden_sd(golden).items()}
  path = tmp_path / "best.ckpt"
  # The layout of the authors' save_ckpt: config, epoch, model_val, state_dict, optimizer.
  torch.save({"config": {"lr": 3e-4, "collection": "tvr"}, "epoch": 3, "model_val": 10.5,
              "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
  loaded = torch_msc.load_torch_checkpoint(path)
  _, params = state_dict.convert(loaded, num_heads=4, sft_factor=0.09)
  np.testing.assert_array_equal(params["vproj_clip"]["kernel"], golden["param/vproj_clip.weight"].T)
  out_file = tmp_path / "params.msgpack"
  assert torch_msc.main(["--ckpt", str(path), "--out", str(out_file)]) == 0
  assert out_file.stat().st_size > 4 * sum(v.numel() for v in sd.values())


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
  pytest.importorskip("torch")
  bad = tmp_path / "broken.pth"
  bad.write_bytes(b"not a checkpoint at all")
  with pytest.raises(state_dict.ConversionError, match="broken.pth"):
    torch_msc.load_torch_checkpoint(bad)
  assert torch_msc.main(["--ckpt", str(bad)]) == 2
  assert "error: cannot read checkpoint" in capsys.readouterr().err
  assert torch_msc.main(["--ckpt", str(tmp_path / "missing.pth")]) == 2


def test_remat_blocks_gives_the_same_losses_and_gradients(golden, converted):
  import dataclasses  # pylint: disable=import-outside-toplevel

  from prvr_jax.losses.config import LossConfig  # pylint: disable=import-outside-toplevel
  from prvr_jax.losses.total import msc_loss  # pylint: disable=import-outside-toplevel

  cfg, params = converted
  batch = {k[len("batch/"):]: jnp.asarray(v) for k, v in golden.items() if k.startswith("batch/")}

  def value_and_grad(remat):
    model = MSCNet(dataclasses.replace(cfg, remat=remat))

    def loss(p):
      # Dropout on: the recomputed forward pass must draw the same masks.
      out = model.apply({"params": p}, batch, deterministic=False,
                        rngs={"dropout": jax.random.key(3)})
      return msc_loss(out, batch, LossConfig(), jax.random.key(0), True)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (total, parts), grads = value_and_grad("none")
  (total_r, parts_r), grads_r = value_and_grad("blocks")
  np.testing.assert_allclose(total_r, total, rtol=1e-6)
  for name in parts:
    np.testing.assert_allclose(parts_r[name], parts[name], rtol=1e-6, atol=1e-7, err_msg=name)
  flat, flat_r = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(grads_r)
  assert flat.keys() == flat_r.keys()
  for name, g in flat.items():
    np.testing.assert_allclose(flat_r[name], g, rtol=1e-4, atol=1e-7, err_msg="/".join(name))
  # The rematerialised program really recomputes: its gradient jaxpr holds checkpoint calls.
  jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(lambda q: MSCNet(dataclasses.replace(cfg, remat="blocks"))
                                                 .apply({"params": q}, batch)["video_query"].sum())(p))(params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr

