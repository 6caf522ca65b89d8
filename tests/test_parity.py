"""The full-pipeline parity command on the public golden file and on a derived file of another size."""

from __future__ import annotations

import numpy as np
import pytest

from prvr_jax.convert import golden_parity, torch_msc
from tests.conftest import GOLDEN_PATH


def _subset_golden(g: dict[str, np.ndarray], videos: list[int]) -> dict[str, np.ndarray]:
  """A golden file of the same format for a subset of the training videos (other B and Q).

  Per-video and per-caption keys are sliced; keys that depend on the whole batch (losses,
  gradients, batch-level diagnostics) are dropped, as a file made for that batch would differ.
  """
  vids = np.asarray(videos)
  cap_video = g["input/cap_video"]
  caps = np.flatnonzero(np.isin(cap_video, vids))
  remap = {v: i for i, v in enumerate(vids)}
  out = {k: v for k, v in g.items() if k.startswith(("param/", "val_input/", "eval/", "config/"))}
  fo, co = g["input/frame_offsets"], g["input/cap_offsets"]
  out["input/frames"] = np.concatenate([g["input/frames"][fo[v]:fo[v + 1]] for v in vids])
  out["input/frame_offsets"] = np.concatenate([[0], np.cumsum([fo[v + 1] - fo[v] for v in vids])])
  out["input/caps"] = np.concatenate([g["input/caps"][co[q]:co[q + 1]] for q in caps])
  out["input/cap_offsets"] = np.concatenate([[0], np.cumsum([co[q + 1] - co[q] for q in caps])])
  out["input/cap_video"] = np.array([remap[v] for v in cap_video[caps]])
  lmax = int(np.max(np.diff(out["input/cap_offsets"])))
  per_video = [k for k in g if k.startswith(("batch/clip", "batch/frame", "batch/videos", "batch/merge",
                                              "data/", "cbva/", "out/encoded_clip", "out/encoded_frame",
                                              "out/intra", "out/merge", "dbg/clip_input", "dbg/clip_pos",
                                              "dbg/clip_encoder", "dbg/frame", "dbg/vid"))]
  for k in per_video:
    if k.endswith("branch_out"):
      out[k] = g[k][:, vids]
    elif not k.startswith("dbg/gauss"):
      out[k] = g[k][vids]
  for k in ("batch/text_feat", "batch/text_mask", "out/video_query", "out/clip_query", "out/encoded_query",
            "dbg/query_input_proj", "dbg/query_pos_embed", "dbg/query_encoder"):
    out[k] = g[k][caps][:, :lmax] if g[k].ndim >= 2 and k not in ("out/video_query", "out/clip_query") else g[k][caps]
  for k in ("out/clip_scale_scores", "out/clip_scale_scores_", "out/frame_scale_scores", "out/frame_scale_scores_"):
    out[k] = g[k][caps][:, vids]
  out["batch/text_labels"] = out["input/cap_video"]
  return out


@pytest.mark.slow
def test_parity_command_passes_on_public_golden(capsys):
  assert torch_msc.main(["--golden", str(GOLDEN_PATH)]) == 0
  text = capsys.readouterr().out
  assert "0 failed, 0 skipped" in text
  compared = int(text.split(" keys compared")[0].split()[-1])
  assert compared >= 80
  for key in ("data/opt_label_32", "cbva/final_labels", "loss/total", "grad/weight_token", "eval/r_sum"):
    assert f"\n{key} " in text


@pytest.mark.slow
def test_parity_on_a_golden_file_of_another_batch_size(golden, tmp_path):
  path = tmp_path / "subset.npz"
  np.savez(path, **_subset_golden(golden, [0, 2, 3, 5]))
  rows = golden_parity.run_parity(path)
  failed = [r.key for r in rows if r.ok is False]
  assert not failed, failed
  keys = {r.key for r in rows}
  assert {"batch/merged_frame_label", "out/frame_scale_scores_", "cbva/per_video_loss", "eval/r_sum"} <= keys
  assert len(rows) >= 55


def test_report_fails_on_a_key_out_of_tolerance(capsys):
  rows = [golden_parity._compare("out/video_query", "features", np.ones(3) + 5e-4, np.ones(3)),
          golden_parity._compare("cbva/final_labels", "exact", np.array([0, 1]), np.array([0, 1]))]
  assert rows[0].ok is False and rows[1].ok is True
  assert golden_parity.print_report(rows) is False
  assert "FAILED: out/video_query" in capsys.readouterr().out
  assert golden_parity._compare("x", "exact", np.zeros((2, 3)), np.zeros((3, 2))).ok is False


def test_bad_golden_files_are_clear_errors(tmp_path, capsys):
  assert torch_msc.main(["--golden", str(tmp_path / "nope.npz")]) == 2
  assert "golden file not found" in capsys.readouterr().err
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"garbage")
  assert torch_msc.main(["--golden", str(bad)]) == 2
  assert "cannot read golden file" in capsys.readouterr().err
  partial = tmp_path / "partial.npz"
  np.savez(partial, **{"input/frames": np.zeros((3, 4), np.float32)})
  assert torch_msc.main(["--golden", str(partial)]) == 2
  assert "lacks required keys" in capsys.readouterr().err


@pytest.mark.slow
def test_bfloat16_losses_within_3e_2_and_discrete_outputs_equal_on_public_golden():
  from prvr_jax.convert import dtype_parity  # pylint: disable=import-outside-toplevel

  result = dtype_parity.compare_dtypes(GOLDEN_PATH, "bfloat16")
  assert {"total", "clip_nce", "frame_nce", "clip_trip", "frame_trip", "tcpl", "cbva"} <= set(result["losses"])
  assert result["worst_rel"] <= 3e-2, result["losses"]
  # bfloat16 is in effect (an ignored dtype would give float32's values exactly).
  assert result["worst_rel"] > 1e-5
  assert result["discrete"] and result["discrete_equal"], result["discrete"]
