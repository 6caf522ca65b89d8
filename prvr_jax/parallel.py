"""Devices and processes: the data mesh, one idempotent `jax.distributed` start-up, and global
batches assembled from host-local numpy batches."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prvr_jax.errors import ConfigError

DATA_AXIS = "data"
# Environment of an explicit multi-process start (launch/local_multiprocess.sh sets these).
ENV_COORDINATOR = "PRVR_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PRVR_NUM_PROCESSES"
ENV_PROCESS_ID = "PRVR_PROCESS_ID"
# PRVR_DISTRIBUTED=auto: let JAX detect the cluster (TPU pod slices, SLURM, ...).
ENV_DISTRIBUTED = "PRVR_DISTRIBUTED"

_started = False


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Starts `jax.distributed` once per process when the environment asks for it.

  Explicit: PRVR_COORDINATOR_ADDRESS (host:port), PRVR_NUM_PROCESSES, PRVR_PROCESS_ID. Automatic:
  PRVR_DISTRIBUTED=auto. Otherwise nothing happens (one process). Must run before any other JAX
  call touches a backend. Returns True when this process is part of a multi-process run.
  """
  global _started
  env = os.environ if env is None else env
  if _started:
    return True
  if env.get(ENV_COORDINATOR):
    try:
      num, pid = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
    except (KeyError, ValueError) as e:
      raise ConfigError(f"{ENV_COORDINATOR} is set, so {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must "
                       f"be integers ({e})") from None
    # CPU processes exchange collectives through gloo; accelerators use their own transport.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env[ENV_COORDINATOR], num_processes=num,
                               process_id=pid)
    _started = True
  elif env.get(ENV_DISTRIBUTED, "").lower() == "auto":
    jax.distributed.initialize()
    _started = True
  if _started:
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  return _started


def make_data_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over all (or the given) devices with the axis `data` (Auto axis type: the forward is
  partitioned by GSPMD propagation from the batch sharding; only the loss is a shard_map)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "data.batch_size") -> None:
  """A global batch must split evenly over the devices (and hence over the processes)."""
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(f"{what}={batch_size} does not divide by the {n} devices of the mesh; use a "
                     f"multiple of {n} (the default configs use multiples of 8)")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's numpy batch -> global arrays split over `data` along the leading axis.

  Each process passes its own rows (in process order); with one process this is a device_put.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def globalize_text_labels(labels: np.ndarray, local_videos: int) -> np.ndarray:
  """Query labels index videos of the local batch; in the global batch, process p's videos start
  at p * local_videos. (Q_local,) -> (Q_local,) int32."""
  return (np.asarray(labels, np.int32) + jax.process_index() * local_videos).astype(np.int32)
