"""Huge-page malloc re-exec of the entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prvr_jax.utils import host_memory


RETAIN = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2 ** 46}"
ALL = "glibc.malloc.hugetlb=1:" + RETAIN


def test_environment_adds_missing_tunables_once_and_respects_opt_out(monkeypatch):
  monkeypatch.setattr(host_memory, "_thp_available", lambda: True)
  monkeypatch.setattr(host_memory.sys, "platform", "linux")
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
  env = host_memory.malloc_environment({"PATH": "/bin"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = host_memory.malloc_environment({"PATH": "/bin", "PRVR_JAX_RETAIN_HEAP": "1"})
  assert env["GLIBC_TUNABLES"] == ALL
  # The user's own tunables are kept, including their value of one of ours.
  env = host_memory.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.pthread.rseq=0",
                                        "PRVR_JAX_RETAIN_HEAP": "1"})
  assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:glibc.pthread.rseq=0:"
                                   "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
                                   f"glibc.malloc.trim_threshold={2 ** 46}")
  # All present (the re-executed process itself), or opted out: nothing to do.
  assert host_memory.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
  assert host_memory.malloc_environment({"GLIBC_TUNABLES": ALL, "PRVR_JAX_RETAIN_HEAP": "1"}) is None
  assert host_memory.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert host_memory.malloc_environment({"PRVR_JAX_HUGE_PAGES": "0"}) is None
  monkeypatch.setattr(host_memory, "_thp_available", lambda: False)
  assert host_memory.malloc_environment({}) is None


@pytest.mark.skipif(host_memory.malloc_environment({}) is None,
                    reason="no glibc / transparent huge pages here")
@pytest.mark.parametrize("opt_out,retain", [(False, False), (False, True), (True, True)])
def test_bench_entry_point_reexecs_with_malloc_tunables(opt_out, retain):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if opt_out:
    env["PRVR_JAX_HUGE_PAGES"] = "0"
  env["PRVR_JAX_RETAIN_HEAP"] = "1" if retain else "0"
  out = subprocess.run([sys.executable, "-m", "prvr_jax.bench", "tome", "--batch", "2", "--repeats", "1"],
                       env=env, capture_output=True, text=True, check=True, timeout=300)
  (record,) = [json.loads(line) for line in out.stdout.splitlines()]
  assert record["machine"]["huge_page_malloc"] is (not opt_out)
  expected = "" if opt_out else (ALL if retain else "glibc.malloc.hugetlb=1")
  assert record["machine"]["malloc_tunables"] == expected


def test_no_reexec_when_jax_will_run_on_an_accelerator(monkeypatch):
  monkeypatch.setattr(host_memory, "_thp_available", lambda: True)
  monkeypatch.setattr(host_memory.sys, "platform", "linux")
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
  assert host_memory.malloc_environment({"JAX_PLATFORMS": "cuda,cpu"}) is None
  assert host_memory.malloc_environment({"JAX_PLATFORMS": "cpu"}) is not None
  assert host_memory.malloc_environment({}) is not None
  # JAX_PLATFORMS unset: an installed CUDA plugin makes the GPU the default backend.
  monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                      lambda name: object() if name == "jax_cuda13_plugin" else None)
  assert host_memory.malloc_environment({}) is None
  assert host_memory.malloc_environment({"JAX_PLATFORMS": "cpu"}) is not None
