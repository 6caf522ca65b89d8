"""Huge pages for XLA:CPU's per-step temporaries, and optionally a heap that keeps them (glibc).

Why: XLA's CPU runtime allocates each execution's temporaries as one block (about 7 GB for the
B = 128 TVR train step) from a worker thread and frees it afterwards. By default glibc serves
such a block with its own mmap and unmaps it on free, so every step faults in and zeroes every
page again: 2.3M 4 KiB page faults per step. The entry points therefore re-exec once (same PID,
same arguments; glibc reads tunables only at start-up) with

  glibc.malloc.hugetlb=1         transparent huge pages for malloc'd memory (512x fewer faults):
                                 B = 128 step 15.3 s -> 12.1 s on a 2-core Xeon.

Huge pages still leave 4-5 CPU-seconds of kernel page zeroing per B = 128 step. With
PRVR_JAX_RETAIN_HEAP=1 three more tunables keep the block mapped from step to step:

  glibc.malloc.arena_max=1       one arena: worker threads' blocks come from the main heap
                                 (a thread arena mmaps every block over 64 MB, whatever the rest)
  glibc.malloc.mmap_max=0        no per-block mmap, hence no unmap when a block is freed
  glibc.malloc.trim_threshold=.. freed heap memory is not handed back to the kernel

Kernel time 4-5 -> 0.2 CPU-s per B = 128 step, the step 12.4-13.5 s -> 11.2 s. Not the default:
with one arena every thread (the data loader's too) shares one malloc lock, and the small-batch
demo ran 0.70 -> 1.16 s per step; the process also keeps its peak heap until it exits. Use it for
large-batch training on CPU. Tunables the user has set are kept as they are;
PRVR_JAX_HUGE_PAGES=0 opts out of all of it.

On a GPU or TPU run (JAX_PLATFORMS names another platform first, or, unset, a CUDA / ROCm / TPU
plugin is installed) there is no re-exec: the temporaries then live in device memory, so the
host tunables would change nothing worth a second process start. Decided without importing JAX,
which must not be imported before the re-exec.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Mapping, Optional

_RETAIN = "PRVR_JAX_RETAIN_HEAP"
# (name, value), in the order they are appended to GLIBC_TUNABLES.
_HUGE_PAGES = (("glibc.malloc.hugetlb", "1"),)
_RETAIN_HEAP = (
    ("glibc.malloc.arena_max", "1"),
    ("glibc.malloc.mmap_max", "0"),
    ("glibc.malloc.trim_threshold", str(2 ** 46)),
)
_OPT_OUT = "PRVR_JAX_HUGE_PAGES"
# Modules whose presence makes an accelerator JAX's default backend (JAX_PLATFORMS unset).
_ACCELERATOR_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin", "libtpu")


def accelerator_expected(environ: Mapping[str, str]) -> bool:
  """Whether JAX will run on a GPU / TPU: JAX_PLATFORMS' first entry when set, else whether an
  accelerator plugin is installed. Does not import JAX."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] != "cpu"
  return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _thp_available() -> bool:
  """True when the kernel grants transparent huge pages at least on request ('madvise')."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      mode = f.read()
  except OSError:
    return False
  return "[always]" in mode or "[madvise]" in mode


def malloc_environment(environ: Mapping[str, str]) -> Optional[dict[str, str]]:
  """The environment to re-exec with, or None when nothing should change.

  Args:
    environ: the current environment.

  Returns:
    a copy of `environ` with every tunable (`_HUGE_PAGES`, plus `_RETAIN_HEAP` when
    PRVR_JAX_RETAIN_HEAP=1) that GLIBC_TUNABLES lacks appended, or None when none is missing,
    the user opted out, or it does not apply (not Linux with glibc and transparent huge pages,
    or an accelerator run: `accelerator_expected`).
  """
  if environ.get(_OPT_OUT, "1") == "0" or accelerator_expected(environ):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  present = {item.split("=", 1)[0] for item in current.split(":") if item}
  wanted = _HUGE_PAGES + (_RETAIN_HEAP if environ.get(_RETAIN, "0") == "1" else ())
  missing = [f"{name}={value}" for name, value in wanted if name not in present]
  if not missing:
    return None
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not _thp_available():
    return None
  updated = dict(environ)
  updated["GLIBC_TUNABLES"] = ":".join(([current] if current else []) + missing)
  return updated


def reexec_with_malloc_tunables() -> None:
  """Re-executes this Python command line with the malloc tunables, if that applies (module doc).

  Call first thing in an entry point's `if __name__ == "__main__":` block; returns normally
  when nothing needs to change (including in the re-executed process).
  """
  env = malloc_environment(os.environ)
  if env is None or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)


def huge_pages_active() -> bool:
  """Whether this process runs with huge-page malloc (for benchmark records)."""
  return "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")


def malloc_tunables() -> str:
  """This process's GLIBC_TUNABLES (for benchmark records); '' when unset."""
  return os.environ.get("GLIBC_TUNABLES", "")
