"""The typed Run: every config resolves into validated sections and back to the same JSON, and a
config.json written by an older version still loads."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

from prvr_jax.data.config import DataConfig
from prvr_jax.errors import ConfigError
from prvr_jax.run import RunConfig, trained_run
from prvr_jax.train import checkpoint
from tests.conftest import REPO_ROOT

CONFIGS = ("synthetic", "tvr", "activitynet", "charades", "qvhighlights")
# A resolved config.json as the training loop wrote it before the typed sections existed.
OLD_CONFIG = REPO_ROOT / "tests" / "fixtures" / "old_run_config.json"


@pytest.mark.parametrize("name", CONFIGS)
def test_sections_round_trip_to_the_same_config_json(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  sections = RunConfig.from_config_dict(config)
  assert sections.data.name == name and sections.model.caption_tower is None
  assert (sections.to_config_dict().to_json_best_effort(indent=2, sort_keys=True)
          == config.to_json_best_effort(indent=2, sort_keys=True))


def test_each_default_is_stated_once():
  # configs/data_defaults.py used to say 32 and the pipeline 128 for the same key.
  from configs import data_defaults  # pylint: disable=import-outside-toplevel

  assert data_defaults.data_section("tvr").eval_video_batch_size == DataConfig.eval_video_batch_size
  assert RunConfig.from_config_dict({}).data == DataConfig()


def test_an_old_runs_config_json_still_loads(tmp_path):
  old = json.loads(OLD_CONFIG.read_text())
  shutil.copy(OLD_CONFIG, tmp_path / checkpoint.CONFIG_FILE)
  run = trained_run(str(tmp_path))
  assert (run.model.visual_input_size, run.model.query_input_size) == (64, 64)
  assert run.data.batch_size == old["data"]["batch_size"] and run.config.seed == old["seed"]
  assert run.eval.final_splits == tuple(old["eval"]["final_splits"])
  # Older still: runs from before config.text_tower existed; the key takes its default.
  del old["text_tower"]
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(old))
  assert trained_run(str(tmp_path)).config.text_tower.clip_dir == ""


def test_unknown_keys_and_bad_values_are_config_errors():
  with pytest.raises(ConfigError, match=r"unknown data config keys: \['batchsize'\]"):
    RunConfig.from_config_dict({"data": {"batchsize": 8}})
  with pytest.raises(ConfigError, match=r"unknown config sections: \['optimizer'\]"):
    RunConfig.from_config_dict({"optimizer": {}})
  with pytest.raises(ConfigError, match="data.on_error must be one of"):
    DataConfig(on_error="ignore")
  with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
    RunConfig.from_config_dict({"optim": {"name": "sgd"}})


def test_an_unknown_dtype_or_remat_stops_before_any_compilation(tmp_path, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel

  from prvr_jax.train import loop  # pylint: disable=import-outside-toplevel  (before the patch)

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before the config was validated")

  monkeypatch.setattr(jax, "jit", no_compile)
  config = importlib.import_module("configs.synthetic").get_config()
  config.model.dtype = "float16"
  with pytest.raises(ConfigError, match=r"model.dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  config.model.dtype = "bfloat16"
  config.train.remat = "everything"
  with pytest.raises(ConfigError, match=r"train.remat must be one of \['blocks', 'none'\]"):
    loop.train_and_evaluate(config, str(tmp_path), progress=False)
  with pytest.raises(ConfigError, match="config.model.remat is not a config key"):
    RunConfig.from_config_dict({"model": {"remat": "blocks"}})


def test_train_remat_reaches_the_model_config():
  sections = RunConfig.from_config_dict({"train": {"remat": "blocks"}, "model": {"dtype": "bfloat16"}})
  assert (sections.model.remat, sections.model.dtype) == ("blocks", "bfloat16")
  assert "remat" not in sections.to_config_dict().model
  assert sections.to_config_dict().train.remat == "blocks"


def test_config_json_records_the_runtime_and_a_resume_with_other_compute_says_so(tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel

  from prvr_jax import run as run_lib  # pylint: disable=import-outside-toplevel

  shutil.copy(OLD_CONFIG, tmp_path / checkpoint.CONFIG_FILE)
  run = trained_run(str(tmp_path))
  assert run_lib.compute_changes(run) is None  # the old file has neither key: the defaults
  run_lib.write_config(run)
  written = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
  runtime = written["runtime"]
  assert set(runtime) == {"backend", "device_kind", "device_count", "process_count", "dtype", "remat"}
  assert (runtime["dtype"], runtime["remat"], runtime["backend"]) == ("float32", "none", "cpu")
  assert written["model"]["dtype"] == "float32" and written["train"]["remat"] == "none"
  assert trained_run(str(tmp_path)).model == run.model  # the runtime entry does not stop loading
  other = dataclasses.replace(run, config=dataclasses.replace(
      run.config, model=dataclasses.replace(run.model, dtype="bfloat16"),
      train=dataclasses.replace(run.train, remat="blocks")))
  line = run_lib.compute_changes(other)
  assert "\n" not in line
  assert "model.dtype='bfloat16' (was 'float32')" in line and "train.remat='blocks' (was 'none')" in line
  assert "backend cpu" in run_lib.describe_runtime(runtime)
