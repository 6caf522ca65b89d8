"""Every command line reports a user error (`PrvrError`) as one line with status 2, and lets any
other exception (a bug) leave with its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prvr_jax import errors, extract
from prvr_jax.clip.config import ClipConfigError
from prvr_jax.clip.feature_store import StoreError
from prvr_jax.clip.load import CheckpointError as ClipCheckpointError
from prvr_jax.clip.video import VideoError
from prvr_jax.clip.video_features import ExtractError
from prvr_jax.convert import golden_parity, torch_msc
from prvr_jax.convert.state_dict import ConversionError
from prvr_jax.data import pipeline
from prvr_jax.data.formats import DataError
from prvr_jax.search import cli as search_cli
from prvr_jax.search.errors import SearchError
from prvr_jax.text.tokenizer import TokenizerError
from prvr_jax.train.checkpoint import CheckpointError, MissingStepError
from prvr_jax.train.loop import NonFiniteLossError
from tests.conftest import REPO_ROOT


def test_user_error_types_share_the_base_and_keep_their_builtin():
  user_errors = (errors.ConfigError, DataError, CheckpointError, MissingStepError, NonFiniteLossError,
                 SearchError, ClipConfigError, ClipCheckpointError, TokenizerError, ExtractError,
                 StoreError, VideoError, ConversionError, golden_parity.ParityError,
                 pipeline.DatasetNotFoundError, pipeline.SplitNotFoundError)
  assert all(issubclass(e, errors.PrvrError) for e in user_errors)
  # Code that caught the builtin type keeps working.
  assert issubclass(DataError, ValueError) and issubclass(CheckpointError, RuntimeError)
  assert issubclass(pipeline.DatasetNotFoundError, FileNotFoundError)


class _Bug(RuntimeError):
  """Stands for a programming error deep in a command."""


def _raise(exc: BaseException):
  def fail(*args, **kwargs):
    raise exc
  return fail


# (module, attribute the command calls, command line)
COMMANDS = {
    "search": (search_cli, "run_index", ["index", "--workdir", "w", "--features", "f", "--out", "o"]),
    "extract": (extract, "run", ["videos", "--clip", "c", "--out", "o", "--videos", "v", "--fps", "1"]),
    "convert": (torch_msc, "run_parity", ["--golden", "g.npz"]),
    "serve": (search_cli, "serve", ["serve", "--index", "i", "--port", "0"]),
}


def _invoke(name: str) -> int:
  return {"search": search_cli.main, "extract": extract.main, "convert": torch_msc.main,
          "serve": search_cli.main}[name](
      COMMANDS[name][2])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_user_error_is_one_line_and_status_2(name, monkeypatch, capsys):
  module, attribute, _ = COMMANDS[name]
  monkeypatch.setattr(module, attribute, _raise(errors.ConfigError("data.root: no such folder")))
  assert _invoke(name) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == "error: data.root: no such folder"


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("bug", [_Bug("lost an axis"), ValueError("shapes (3,) and (4,)"),
                                 KeyError("video_frames")])
def test_a_bug_keeps_its_traceback(name, bug, monkeypatch):
  # Builtin ValueError / KeyError used to be taken for bad input and hidden; now only PrvrError is.
  module, attribute, _ = COMMANDS[name]
  monkeypatch.setattr(module, attribute, _raise(bug))
  with pytest.raises(type(bug)):
    _invoke(name)


# prvr_jax.main defines absl flags that prvr_jax.ablation defines too: it runs in its own process.
_MAIN = """
import sys
from configs import synthetic
from prvr_jax import errors, main
from prvr_jax.data import prepare
def fail(*args, **kwargs):
  raise errors.ConfigError("data.root: no such folder") if sys.argv[1] == "user" else ValueError("a bug")
prepare.prepare = fail
sys.exit(main.run(synthetic.get_config(), sys.argv[2], "prepare"))
"""


@pytest.mark.parametrize("kind", ["user", "bug"])
def test_main_reports_a_user_error_and_lets_a_bug_raise(kind, tmp_path):
  result = subprocess.run([sys.executable, "-c", _MAIN, kind, str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
  if kind == "user":
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: data.root: no such folder"
  else:
    # A builtin ValueError used to be taken for bad input and its traceback hidden.
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: a bug"


def test_a_bad_config_value_is_one_line_from_the_command_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "prvr_jax.main", "--config=configs/synthetic.py",
                           f"--workdir={tmp_path}", "--mode=prepare",
                           "--config.data.synthetic.min_events=9"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error: need 1 <= min_events" in result.stderr and "Traceback" not in result.stderr
