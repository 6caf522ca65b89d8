"""One run between the config and the code: the typed sections, resolved once, and its state.

  run = resolve_run(config, workdir)      # train / --mode=eval: prepares the dataset when missing,
                                          # takes input sizes from it, resolves the caption tower,
                                          # builds the mesh and sizes the schedule
  run = trained_run(workdir)              # a trained run from its config.json, without its dataset
  optimizer, schedule = make_optimizer(run)
  state = initial_state(run, optimizer)   # or abstract_state(run, optimizer) to restore onto the mesh
  run, params, step = load_trained(workdir, "best")

The raw `ConfigDict` stops here: everything below takes typed sections (`run.data`, `run.model`,
`run.loss`, `run.optim`, `run.train`, `run.eval`), each a frozen dataclass that states its keys'
defaults once and validates them. A config.json written before a key existed still loads (the
key takes its default); an unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections
import optax
from jax.experimental import multihost_utils

from prvr_jax import parallel
from prvr_jax.clip.config import read_config as read_clip_config
from prvr_jax.data import pipeline
from prvr_jax.data.config import DataConfig
from prvr_jax.data.prepare import prepare
from prvr_jax.errors import ConfigError
from prvr_jax.eval.config import EvalConfig
from prvr_jax.losses.config import LossConfig
from prvr_jax.models import caption_tower as caption_tower_lib
from prvr_jax.models.config import RESOLVED_FIELDS, ModelConfig
from prvr_jax.models.msc import init_params
from prvr_jax.train import checkpoint
from prvr_jax.train.config import OptimConfig, TextTowerConfig, TrainConfig
from prvr_jax.train.optim import make_optimizer as make_optax_optimizer
from prvr_jax.train.optim import warmup_linear_schedule
from prvr_jax.train.step import TrainState, create_train_state
from prvr_jax.utils.config import section_dict

# config.json's record of where the run computed (`runtime_info`): written, never read as config.
RUNTIME_KEY = "runtime"
# config.<section> -> its dataclass.
SECTIONS: dict[str, type] = dict(data=DataConfig, model=ModelConfig, loss=LossConfig,
                                 optim=OptimConfig, train=TrainConfig, eval=EvalConfig,
                                 text_tower=TextTowerConfig)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole config as typed sections (see `SECTIONS`; `seed`: the run's one seed)."""

  seed: int = 0
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  text_tower: TextTowerConfig = TextTowerConfig()

  def __post_init__(self):
    # The model's remat is the one `train.remat` names, however the sections were put together.
    if self.model.remat != self.train.remat:
      object.__setattr__(self, "model", dataclasses.replace(self.model, remat=self.train.remat))

  @classmethod
  def from_config_dict(cls, config: Mapping[str, Any]) -> "RunConfig":
    """Builds and validates every section of `config` (a ConfigDict or a dict).

    Raises:
      ConfigError: an unknown section or key, or a value no section accepts.
    """
    unknown = sorted(set(config) - {"seed", RUNTIME_KEY, *SECTIONS})
    if unknown:
      raise ConfigError(f"unknown config sections: {unknown}")
    values: dict[str, Any] = {name: section.from_config_dict(config[name])
                              for name, section in SECTIONS.items() if name in config}
    if "seed" in config:
      values["seed"] = int(config["seed"])
    return cls(**values)

  def to_config_dict(self) -> ml_collections.ConfigDict:
    """The config these sections came from (resolved values included): what config.json holds."""
    values: dict[str, Any] = dict(seed=self.seed)
    for name in SECTIONS:
      exclude = RESOLVED_FIELDS if name == "model" else ()
      values[name] = section_dict(getattr(self, name), exclude=exclude)
    return ml_collections.ConfigDict(values)


@dataclasses.dataclass(frozen=True)
class Run:
  """A run resolved once and shared by training, evaluation and search.

  Attributes:
    workdir: the run directory (absolute).
    config: the typed sections; `config.model` has its input sizes and caption tower resolved.
    dataset_dir: the prepared dataset ('' for a run restored without its data).
    mesh: the 1-D `data` mesh over every device of every process.
    steps_per_epoch, total_steps: the schedule (0 for a run restored without its data).
  """

  workdir: str
  config: RunConfig
  dataset_dir: str
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  total_steps: int

  @property
  def data(self) -> DataConfig:
    return self.config.data

  @property
  def model(self) -> ModelConfig:
    return self.config.model

  @property
  def loss(self) -> LossConfig:
    return self.config.loss

  @property
  def optim(self) -> OptimConfig:
    return self.config.optim

  @property
  def train(self) -> TrainConfig:
    return self.config.train

  @property
  def eval(self) -> EvalConfig:
    return self.config.eval


def is_chief() -> bool:
  """Process 0 writes the run's files other than checkpoints (Orbax coordinates those itself)."""
  return jax.process_index() == 0


def resolve_caption_tower(sections: RunConfig, info: pipeline.SplitInfo,
                          workdir: str) -> Optional[caption_tower_lib.CaptionTowerConfig]:
  """The in-model CLIP text tower of `text_tower` (None when `clip_dir` is empty).

  A run that already has one (its workdir's caption_tower.json) keeps it, so resuming or
  evaluating does not need the CLIP directory; a new run reads the checkpoint's config.json.
  """
  t = sections.text_tower
  if not t.clip_dir:
    return None
  kept = caption_tower_lib.read_from_workdir(workdir)
  if kept is not None:
    changed = [f"text_tower.{k}={getattr(t, k)!r} (the run has {getattr(kept, k)!r})"
               for k in ("features", "trainable_blocks") if getattr(t, k) != getattr(kept, k)]
    if changed:
      raise ConfigError(f"{os.path.join(workdir, caption_tower_lib.WORKDIR_FILE)}: this workdir's "
                        f"run was built with another caption tower: {', '.join(changed)}; use a "
                        "new workdir")
    if t.dtype != kept.dtype:  # compute only: the tower's parameters are float32 either way
      logging.info("text_tower.dtype is %s (the run so far used %s)", t.dtype, kept.dtype)
      kept = dataclasses.replace(kept, dtype=t.dtype)
    return kept
  clip = read_clip_config(t.clip_dir)
  return caption_tower_lib.CaptionTowerConfig(
      text=clip.text, projection_dim=clip.projection_dim, features=t.features,
      trainable_blocks=int(t.trainable_blocks),
      max_query_tokens=pipeline.resolve_max_tokens(info, sections.data.max_caption_tokens),
      truncate_keep_eos=sections.data.truncate_keep_eos, source=os.path.abspath(t.clip_dir),
      dtype=t.dtype)


def resolve_model_config(model: ModelConfig, info: pipeline.SplitInfo,
                         caption_tower: Optional[caption_tower_lib.CaptionTowerConfig] = None
                         ) -> ModelConfig:
  """`model` with input sizes 0 taken from the dataset (the query width from the caption tower
  when there is one); a size that contradicts them is an error naming both."""
  sizes = [("visual_input_size", info.video_dim, f"the dataset {info.dataset_dir} has")]
  if caption_tower is None:
    sizes.append(("query_input_size", info.text_dim, f"the dataset {info.dataset_dir} has"))
  else:
    sizes.append(("query_input_size", caption_tower.width,
                  f"the CLIP text tower of {caption_tower.source} gives"))
  resolved = {}
  for key, actual, where in sizes:
    value = getattr(model, key)
    if value not in (0, actual):
      raise ConfigError(f"config.model.{key}={value} but {where} {actual}-d features; set "
                        f"--config.model.{key}={actual} (or 0 = from data)")
    resolved[key] = actual
  return dataclasses.replace(model, caption_tower=caption_tower, **resolved)


def ensure_dataset(data: DataConfig, workdir: str) -> str:
  """The prepared dataset of `data` (process 0 builds it when missing; others wait)."""
  dataset_dir = pipeline.dataset_dir_from_config(data, workdir)
  if not pipeline.is_prepared(dataset_dir) and is_chief():
    logging.info("dataset not found at %s: preparing it", dataset_dir)
    prepare(data, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("prvr_jax: dataset ready")
  return dataset_dir


def _steps_per_epoch(data: DataConfig, info: pipeline.SplitInfo) -> int:
  if data.drop_remainder:
    steps = info.num_videos // data.batch_size
  else:
    steps = math.ceil(info.num_videos / data.batch_size)
  if steps < 1:
    raise ConfigError(f"the train split of {info.dataset_dir} has {info.num_videos} videos, fewer "
                      f"than data.batch_size={data.batch_size} with data.drop_remainder=True")
  return steps


def resolve_run(config: Mapping[str, Any] | RunConfig, workdir: str) -> Run:
  """Validates the config, prepares the data if needed, resolves the model, builds the mesh,
  sizes the schedule (and keeps a caption tower's config in the workdir)."""
  workdir = os.path.abspath(workdir)
  sections = config if isinstance(config, RunConfig) else RunConfig.from_config_dict(config)
  mesh = parallel.make_data_mesh()
  data = sections.data
  parallel.check_divisible(data.batch_size, mesh, "data.batch_size")
  for key in ("eval_video_batch_size", "eval_query_batch_size"):
    parallel.check_divisible(getattr(data, key), mesh, f"data.{key}")
  dataset_dir = ensure_dataset(data, workdir)
  info = pipeline.open_split(dataset_dir, data.train_split)
  tower = resolve_caption_tower(sections, info, workdir)
  model = resolve_model_config(sections.model, info, tower)
  if tower is not None and is_chief():
    caption_tower_lib.write_to_workdir(tower, workdir)
  steps_per_epoch = _steps_per_epoch(data, info)
  return Run(workdir, dataclasses.replace(sections, model=model), dataset_dir, mesh,
             steps_per_epoch, steps_per_epoch * sections.train.num_epochs)


def trained_run(workdir: str) -> Run:
  """A trained run from its resolved `config.json`, without touching the dataset (searching or
  converting a run works on a machine that does not hold its data); `steps_per_epoch` and
  `total_steps` are 0 there: restoring does not need them.

  Raises:
    checkpoint.CheckpointError: no config.json, or one whose sizes were never resolved.
  """
  workdir = os.path.abspath(workdir)
  sections = RunConfig.from_config_dict(checkpoint.read_config(workdir))
  tower = None
  if sections.text_tower.clip_dir:
    tower = caption_tower_lib.read_from_workdir(workdir)
    if tower is None:
      raise checkpoint.CheckpointError(f"{os.path.join(workdir, caption_tower_lib.WORKDIR_FILE)}: "
                                       "missing; the run's config has a CLIP text tower "
                                       f"(text_tower.clip_dir={sections.text_tower.clip_dir!r})")
  model = sections.model.replace_caption_tower(tower)
  if not (model.visual_input_size and model.query_input_size):
    raise checkpoint.CheckpointError(f"{os.path.join(workdir, checkpoint.CONFIG_FILE)}: model input "
                                     "sizes are not resolved (0); is this a training workdir?")
  return Run(workdir, dataclasses.replace(sections, model=model), "", parallel.make_data_mesh(), 0, 0)


def runtime_info(model: ModelConfig) -> dict[str, Any]:
  """Where and how a run computes: `backend`, `device_kind`, `device_count` (all processes),
  `process_count`, the model's compute `dtype` and `remat`."""
  devices = jax.devices()
  return dict(backend=jax.default_backend(), device_kind=str(devices[0].device_kind),
              device_count=len(devices), process_count=jax.process_count(), dtype=model.dtype,
              remat=model.remat)


def describe_runtime(info: Mapping[str, Any]) -> str:
  """One line of `runtime_info`, printed at the start of every training run."""
  return (f"prvr_jax: backend {info['backend']} ({info['device_kind']} x {info['device_count']}, "
          f"{info['process_count']} process(es)), dtype {info['dtype']}, remat {info['remat']}")


def compute_changes(run: Run) -> Optional[str]:
  """One line naming the compute dtype / remat that differ from those of the config.json already
  in the run's workdir (a resumed run), or None when none differs or there is no config.json.
  Resuming works either way: parameters and optimizer state are float32 whatever the dtype."""
  if not os.path.isfile(os.path.join(run.workdir, checkpoint.CONFIG_FILE)):
    return None
  before = RunConfig.from_config_dict(checkpoint.read_config(run.workdir))
  changed = [f"{name}={new!r} (was {old!r})" for name, old, new in (
      ("model.dtype", before.model.dtype, run.model.dtype),
      ("train.remat", before.train.remat, run.train.remat)) if old != new]
  if not changed:
    return None
  return (f"prvr_jax: resuming {run.workdir} with {', '.join(changed)}; parameters and optimizer "
          "state are float32 either way")


def write_config(run: Run) -> str:
  """Writes the resolved config to `<workdir>/config.json` (what `load_trained` reads), with a
  `runtime` entry (`runtime_info`) that loading ignores."""
  values = run.config.to_config_dict()
  values[RUNTIME_KEY] = runtime_info(run.model)
  return checkpoint.write_config(values, run.workdir)


def make_optimizer(run: Run) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The configured optimiser with warm-up over `optim.warmup_fraction` of the steps, then linear
  decay (frozen caption-tower parameters get no updates). A run restored without its data has no
  schedule length; its optimiser only serves to shape the state being restored."""
  o = run.optim
  schedule = warmup_linear_schedule(o.lr, max(run.total_steps, 1), o.warmup_fraction)
  optimizer = make_optax_optimizer(o.name, schedule, weight_decay=o.weight_decay,
                                   max_grad_norm=o.max_grad_norm,
                                   caption_tower=run.model.caption_tower)
  return optimizer, schedule


def initial_state(run: Run, optimizer: optax.GradientTransformation) -> TrainState:
  """Fresh replicated TrainState from `seed` (a caption tower starts from its CLIP checkpoint's
  weights)."""
  key = jax.random.fold_in(jax.random.key(run.config.seed), 0)
  rep = parallel.replicated(run.mesh)
  tower = run.model.caption_tower
  if tower is None:
    init = jax.jit(lambda k: create_train_state(init_params(run.model, k), optimizer),
                   out_shardings=rep)
    return init(key)
  tower_params = caption_tower_lib.load_tower_params(run.config.text_tower.clip_dir, tower)

  def init_with_tower(k, loaded):
    params = dict(init_params(run.model, k))
    params[caption_tower_lib.PARAMS_KEY] = loaded
    return create_train_state(params, optimizer)

  # The weights are an argument, not constants folded into the program.
  return jax.jit(init_with_tower, out_shardings=rep)(key, tower_params)


def abstract_state(run: Run, optimizer: optax.GradientTransformation) -> Any:
  """Shapes and (replicated) shardings of the TrainState, for restoring onto this mesh."""
  shapes = jax.eval_shape(lambda k: create_train_state(init_params(run.model, k), optimizer),
                          jax.random.key(0))
  return checkpoint.abstract_with_sharding(shapes, parallel.replicated(run.mesh))


def load_trained(workdir: str, which: str = "best", *, with_data: bool = False,
                 step: Optional[int] = None) -> tuple[Run, Any, int]:
  """(run, params, step) of a trained run.

  Args:
    workdir: the training workdir.
    which: 'best' (by val SumR, falling back to the latest when no evaluation was saved) or
      'latest'; ignored when `step` is given.
    with_data: also open (and, when missing, prepare) the run's dataset, as evaluation needs.
    step: restore exactly this step.

  Raises:
    checkpoint.CheckpointError: no run, no such checkpoint, or a corrupt one
      (`checkpoint.MissingStepError` when `step` is no longer kept).
  """
  run = resolve_run(checkpoint.read_config(workdir), workdir) if with_data else trained_run(workdir)
  optimizer, _ = make_optimizer(run)
  manager = checkpoint.make_manager(workdir, read_only=True)
  try:
    if step is None and which == "best":
      step = checkpoint.best_step(manager)
    elif step is not None and step not in manager.all_steps():
      kept = ", ".join(map(str, sorted(manager.all_steps()))) or "none"
      raise checkpoint.MissingStepError(f"{checkpoint.checkpoint_dir(workdir)}: checkpoint step "
                                        f"{step} is not there (kept steps: {kept})")
    step, state, _, _ = checkpoint.restore(manager, abstract_state(run, optimizer), step)
  finally:
    manager.close()
  return run, state.params, step
