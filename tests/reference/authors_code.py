"""Imports the authors' unmodified MSC code (admins97/MSC_PRVR) from a local copy.

The copy is found through the environment variable MSC_PRVR_SRC, the path of the repository's
`src/` folder (the one holding `main.py`); nothing of it is vendored here. No file of it is
edited: the shims below are run-time only, and each is needed to run it on a CPU-only machine
without its unused imports:

* `ipdb`, `seaborn` and `easydict` are imported but not needed (`easydict.EasyDict` is given a
  plain attribute-dict stand-in; the code only reads and writes attributes of it);
* `torch.Tensor.cuda` / `torch.nn.Module.cuda` return their object unchanged (CPU run);
* `Datasets.builder` hard-codes the TVR moment-annotation path `/project/prvr/dataset/tvr/...`;
  those annotations only feed `st_indices`/`ed_indices`, which no loss reads, so the dataset
  classes are called with `path_query_json=None`;
* `main.py` parses `sys.argv` when imported; it is imported with an empty command line and its
  `args` are set by the caller.
"""

from __future__ import annotations

import os
import pathlib
import sys
import types
from typing import Any, Optional

import torch

ENV_VAR = "MSC_PRVR_SRC"
# Keys their main() copies from its command line into the config (not in Configs/tvr.py).
MAIN_ARGS = ("model_name", "map_size", "vl_coef", "sim_thr", "rkd_d_coef", "rkd_a_coef")


def source_dir() -> Optional[pathlib.Path]:
  """The authors' `src/` folder from $MSC_PRVR_SRC, or None when unset or not such a folder."""
  value = os.environ.get(ENV_VAR)
  if not value:
    return None
  path = pathlib.Path(value)
  return path if (path / "main.py").is_file() and (path / "Losses" / "loss.py").is_file() else None


class _AttrDict(dict):
  """What the authors' code uses of easydict.EasyDict: a dict with attribute access."""

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e

  def __setattr__(self, name: str, value: Any) -> None:
    self[name] = value


def _install_shims() -> None:
  for name in ("ipdb", "seaborn"):
    module = types.ModuleType(name)
    module.set_trace = lambda *a, **k: None
    sys.modules.setdefault(name, module)
  easydict = types.ModuleType("easydict")
  easydict.EasyDict = _AttrDict
  sys.modules.setdefault("easydict", easydict)
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.nn.Module.cuda = lambda self, *a, **k: self
  os.environ.setdefault("MPLBACKEND", "Agg")


def _drop_query_json(cls: type) -> type:
  class WithoutMomentFile(cls):  # pylint: disable=too-few-public-methods
    def __init__(self, *args, **kwargs):
      kwargs["path_query_json"] = None
      super().__init__(*args, **kwargs)

  WithoutMomentFile.__name__ = cls.__name__
  return WithoutMomentFile


def load(src: pathlib.Path) -> types.SimpleNamespace:
  """Imports the authors' modules from `src` (idempotent).

  Returns:
    namespace with `main` (the training script as a module), `configs` (Configs.builder),
    `datasets` (Datasets.builder), `models` (Models.builder), `losses` (Losses.builder),
    `opts` (Opts.builder), `validations` (Validations.validations), `data_provider`,
    `utils` (Utils.utils).
  """
  _install_shims()
  # The authors' modules import each other as top-level packages (`from Models...`), so they can
  # only be imported once their folder is on sys.path.
  if str(src) not in sys.path:
    sys.path.insert(0, str(src))
  argv, sys.argv = sys.argv, [str(src / "main.py")]
  try:
    import main as authors_main  # pylint: disable=import-outside-toplevel
  finally:
    sys.argv = argv
  import Configs.builder as configs  # pylint: disable=import-outside-toplevel
  import Datasets.builder as datasets  # pylint: disable=import-outside-toplevel
  import Datasets.data_provider as data_provider  # pylint: disable=import-outside-toplevel
  import Losses.builder as losses  # pylint: disable=import-outside-toplevel
  import Models.builder as models  # pylint: disable=import-outside-toplevel
  import Opts.builder as opts  # pylint: disable=import-outside-toplevel
  import Utils.utils as utils  # pylint: disable=import-outside-toplevel
  import Validations.validations as validations  # pylint: disable=import-outside-toplevel

  for name in ("Dataset4PRVR", "TxtDataSet4PRVR"):
    cls = getattr(data_provider, name)
    if getattr(datasets, name) is cls:
      setattr(datasets, name, _drop_query_json(cls))
  return types.SimpleNamespace(main=authors_main, configs=configs, datasets=datasets,
                               data_provider=data_provider, models=models, losses=losses,
                               opts=opts, utils=utils, validations=validations)


def tvr_config(authors: types.SimpleNamespace, data_root: str | os.PathLike, **overrides: Any) -> dict:
  """The authors' TVR config dict (`Configs/tvr.py`) pointed at `data_root`, with `overrides`.

  The dict is the authors' module-level one (their `main()` reads it again), so it is updated in
  place; `num_workers` is 0 (data loading in this process: its random draws are then in order).
  """
  cfg = authors.configs.get_configs("tvr")
  root = str(data_root).rstrip("/") + "/"
  cfg.update(root=root, data_root=root, num_workers=0, no_core_driver=True, pin_memory=False)
  unknown = sorted(set(overrides) - set(cfg) - set(MAIN_ARGS))
  if unknown:
    raise KeyError(f"not keys of the authors' TVR config: {unknown}")
  cfg.update(overrides)
  return cfg
