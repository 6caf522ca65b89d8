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
