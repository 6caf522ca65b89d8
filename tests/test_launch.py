"""launch/: the local multi-process launcher (with a stand-in program), the TPU pod and SLURM
scripts (dry runs, and their real code paths against fake gcloud / srun / scancel / scontrol)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"
LOCAL = LAUNCH / "local_multiprocess.sh"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"

# A stand-in for prvr_jax.main: records what it saw in <out>/proc_<id>.json, then behaves as its
# first argument says: ok (exit 0), fail (process 1 exits 3, the others sleep), sleep (all sleep;
# SIGTERM prints "checkpoint saved" and exits 0, like the trainer).
STANDIN = textwrap.dedent("""\
    import json, os, signal, sys, time
    mode, out = sys.argv[1], sys.argv[2]
    pid_ = int(os.environ["PRVR_PROCESS_ID"])
    def on_term(signum, frame):
      print("checkpoint saved", flush=True)
      sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    record = {k: os.environ.get(k) for k in ("PRVR_COORDINATOR_ADDRESS", "PRVR_NUM_PROCESSES",
              "PRVR_PROCESS_ID", "PRVR_DISTRIBUTED", "JAX_NUM_CPU_DEVICES", "CUDA_VISIBLE_DEVICES")}
    record.update(pid=os.getpid(), argv=sys.argv[3:])
    with open(os.path.join(out, f"proc_{pid_}.json.tmp"), "w") as f:
      json.dump(record, f)
    os.replace(os.path.join(out, f"proc_{pid_}.json.tmp"), os.path.join(out, f"proc_{pid_}.json"))
    print(f"hello from {pid_}", flush=True)
    if mode == "fail" and pid_ == 1:
      time.sleep(0.3)
      print("boom: something went wrong", file=sys.stderr, flush=True)
      sys.exit(3)
    if mode in ("fail", "sleep"):
      time.sleep(60)
    """)


@pytest.fixture()
def standin(tmp_path):
  path = tmp_path / "standin_mod.py"
  path.write_text(STANDIN)
  out = tmp_path / "records"
  out.mkdir()
  return path, out


def _env(**extra: str) -> dict[str, str]:
  env = dict(os.environ, PYTHON=sys.executable)
  for key in ("PRVR_DISTRIBUTED", "PRVR_LAUNCH_MODULE", "PRVR_LAUNCH_LOGDIR", "PRVR_LAUNCH_PORT",
              "PRVR_LAUNCH_GPUS_PER_PROCESS", "JAX_NUM_CPU_DEVICES", "DRY_RUN"):
    env.pop(key, None)
  env.update(extra)
  return env


def _run(*argv, env=None, timeout=60) -> subprocess.CompletedProcess:
  return subprocess.run([str(a) for a in argv], cwd=REPO_ROOT, env=env or _env(), capture_output=True,
                        text=True, timeout=timeout)


def _records(out: pathlib.Path) -> dict[int, dict]:
  return {int(p.stem.split("_")[1].split(".")[0]): json.loads(p.read_text()) for p in out.glob("proc_*.json")}


def _alive(pid: int) -> bool:
  """True while `pid` is a live process (a zombie counts as gone)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return False
  return state != "Z"


def _wait_until(predicate, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return predicate()


# ------------------------------------------------------------------------------------------------
# local_multiprocess.sh: arguments


def test_local_help():
  result = _run(LOCAL, "--help")
  assert result.returncode == 0
  assert result.stdout.startswith("usage: local_multiprocess.sh") and "PRVR_LAUNCH_MODULE" in result.stdout


def test_local_missing_n_is_a_usage_error():
  result = _run(LOCAL)
  assert result.returncode == 2
  assert "missing N" in result.stderr and "usage:" in result.stderr


@pytest.mark.parametrize("n", ["0", "-1", "two", "1.5", "", "2x", "--config=configs/synthetic.py"])
def test_local_n_must_be_a_positive_integer(n):
  result = _run(LOCAL, n, "--mode=train")
  assert result.returncode == 2
  assert "N must be a positive integer" in result.stderr and "usage:" in result.stderr


def test_local_bad_setting_is_a_usage_error():
  result = _run(LOCAL, "2", env=_env(PRVR_LAUNCH_GRACE="soon"))
  assert result.returncode == 2 and "PRVR_LAUNCH_GRACE" in result.stderr


# ------------------------------------------------------------------------------------------------
# local_multiprocess.sh: running a stand-in program


def test_local_all_succeed(standin, tmp_path):
  script, out = standin
  logdir = tmp_path / "logs"
  result = _run(LOCAL, "3", "--", sys.executable, script, "ok", out, "--flag=1",
                env=_env(PRVR_LAUNCH_LOGDIR=str(logdir), JAX_NUM_CPU_DEVICES="2", PRVR_DISTRIBUTED="auto"))
  assert result.returncode == 0, result.stderr
  records = _records(out)
  assert sorted(records) == [0, 1, 2]
  assert [records[i]["PRVR_PROCESS_ID"] for i in range(3)] == ["0", "1", "2"]
  coordinators = {r["PRVR_COORDINATOR_ADDRESS"] for r in records.values()}
  assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
  for record in records.values():
    assert record["PRVR_NUM_PROCESSES"] == "3" and record["JAX_NUM_CPU_DEVICES"] == "2"
    assert record["PRVR_DISTRIBUTED"] is None and record["argv"] == ["--flag=1"]
    assert record["CUDA_VISIBLE_DEVICES"] == os.environ.get("CUDA_VISIBLE_DEVICES")
  for i in range(3):
    assert f"hello from {i}" in (logdir / f"proc_{i}.log").read_text()
    assert f"[proc {i}] hello from {i}" in result.stdout
  assert "all 3 processes finished successfully" in result.stderr


def test_local_runs_the_module_and_logs_into_the_workdir(standin, tmp_path):
  script, out = standin
  workdir = tmp_path / "run"
  env = _env(PRVR_LAUNCH_MODULE="standin_mod", PYTHONPATH=str(script.parent), PRVR_LAUNCH_STREAM="0",
             PRVR_LAUNCH_PORT="23456")
  result = _run(LOCAL, "2", "ok", out, f"--workdir={workdir}", "--mode=train", env=env)
  assert result.returncode == 0, result.stderr
  records = _records(out)
  assert sorted(records) == [0, 1]
  assert all(r["argv"] == [f"--workdir={workdir}", "--mode=train"] for r in records.values())
  assert {r["PRVR_COORDINATOR_ADDRESS"] for r in records.values()} == {"127.0.0.1:23456"}
  assert "hello from 1" in (workdir / "launch_logs" / "proc_1.log").read_text()
  assert "[proc" not in result.stdout  # PRVR_LAUNCH_STREAM=0: logs only


def test_local_gives_each_process_its_own_gpus(standin, tmp_path):
  script, out = standin
  result = _run(LOCAL, "2", "--", sys.executable, script, "ok", out,
                env=_env(PRVR_LAUNCH_GPUS_PER_PROCESS="2", PRVR_LAUNCH_LOGDIR=str(tmp_path / "logs")))
  assert result.returncode == 0, result.stderr
  records = _records(out)
  assert [records[i]["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["0,1", "2,3"]


def test_local_one_failure_stops_everything_fast(standin, tmp_path):
  script, out = standin
  logdir = tmp_path / "logs"
  start = time.monotonic()
  result = _run(LOCAL, "2", "--", sys.executable, script, "fail", out,
                env=_env(PRVR_LAUNCH_LOGDIR=str(logdir)), timeout=50)
  elapsed = time.monotonic() - start
  assert result.returncode == 3
  assert elapsed < 20, f"took {elapsed:.1f}s; the healthy process sleeps 60 s"
  assert "process 1 of 2 exited with code 3" in result.stderr
  assert "boom: something went wrong" in result.stderr  # the tail of the failed process's log
  assert str(logdir / "proc_1.log") in result.stderr
  records = _records(out)
  assert sorted(records) == [0, 1]
  assert not _alive(records[0]["pid"]) and not _alive(records[1]["pid"])


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_local_signal_stops_all_children(standin, tmp_path, sig, code):
  script, out = standin
  logdir = tmp_path / "logs"
  # Default dispositions in the launcher even if this test runs with SIGINT ignored (a background job).
  proc = subprocess.Popen([str(LOCAL), "2", "--", sys.executable, str(script), "sleep", str(out)], cwd=REPO_ROOT,
                          env=_env(PRVR_LAUNCH_LOGDIR=str(logdir)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    assert _wait_until(lambda: len(_records(out)) == 2, timeout=20), "the stand-ins did not start"
    start = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=20)
    assert time.monotonic() - start < 10
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == code
  assert f"received {sig.name}: stopping all 2 processes" in stderr
  records = _records(out)
  assert not any(_alive(r["pid"]) for r in records.values())
  # Each program got SIGTERM and what it printed while stopping still reached its log.
  for i in range(2):
    assert "checkpoint saved" in (logdir / f"proc_{i}.log").read_text()


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh


def _fake_tool(bin_dir: pathlib.Path, name: str, body: str) -> None:
  """An executable `name` in bin_dir that appends its arguments (one line) to <bin_dir>/<name>.calls."""
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >>"{bin_dir}/{name}.calls"\n{body}\n')
  path.chmod(0o755)


def _calls(bin_dir: pathlib.Path, name: str) -> list[str]:
  path = bin_dir / f"{name}.calls"
  return path.read_text().splitlines() if path.exists() else []


def _printed_commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _remote_command(argv: list[str]) -> str:
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
  assert check.returncode == 0, f"remote command is not valid shell: {command}\n{check.stderr}"
  return command


TPU_ENV = dict(TPU_NAME="my-slice", ZONE="europe-west4-a", ACCELERATOR_TYPE="v5litepod-16",
               RUNTIME_VERSION="v2-alpha-tpuv5-lite", PROJECT="my-project", SPOT="1",
               WORKDIR="gs://my-bucket/prvr/run 1", CONFIG="configs/tvr.py",
               EXTRA_ARGS="--config.train.max_steps=5 --config.seed=1")


def test_tpu_dry_run_prints_every_gcloud_command(tmp_path):
  bin_dir = tmp_path / "bin"
  _fake_tool(bin_dir, "gcloud", "exit 0")
  env = _env(**TPU_ENV, PATH=f"{bin_dir}:{os.environ['PATH']}")
  result = _run(TPU, "--dry-run", "all", "--", "--config.data.root=/mnt/data", env=env)
  assert result.returncode == 0, result.stderr
  assert _calls(bin_dir, "gcloud") == []  # nothing ran
  commands = _printed_commands(result.stdout)
  gcloud = [c for c in commands if c[0] == "gcloud"]
  assert all(c[1:4] == ["compute", "tpus", "tpu-vm"] for c in gcloud)
  assert all(c[5] == "my-slice" for c in gcloud if c[4] != "scp")
  assert all("--zone=europe-west4-a" in c and "--project=my-project" in c for c in gcloud)
  verbs = [c[4] for c in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  create = gcloud[1]
  assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
  # The code: a tarball of the local git HEAD, copied to every worker and unpacked there.
  (archive,) = [c for c in commands if c[0] == "git"]
  assert archive[:3] == ["git", "-C", str(REPO_ROOT)] and "archive" in archive and archive[-1] == "HEAD"
  scp = gcloud[2]
  assert scp[5] == archive[archive.index("-o") + 1] and scp[6].startswith("my-slice:") and "--worker=all" in scp
  assert "tar -xzf" in _remote_command(gcloud[3]) and "--worker=all" in gcloud[3]
  setup = _remote_command(gcloud[4])
  assert "requirements.txt" in setup and "'jax[tpu]==0.10.2'" in setup and "--worker=all" in gcloud[4]
  run = _remote_command(gcloud[5])
  assert "--worker=all" in gcloud[5]
  run_argv = shlex.split(run.split("&&", 1)[1])
  assert run_argv[:2] == ["env", "PRVR_DISTRIBUTED=auto"]
  assert run_argv[2].endswith("prvr_venv/bin/python")
  assert run_argv[3:] == ["-m", "prvr_jax.main", "--config=configs/tvr.py", "--workdir=gs://my-bucket/prvr/run 1",
                          "--mode=train", "--config.train.max_steps=5", "--config.seed=1",
                          "--config.data.root=/mnt/data"]


def test_tpu_dry_run_clones_a_repo_url_and_detaches():
  env = _env(**TPU_ENV, REPO_URL="https://example.org/prvr_jax.git", REPO_REF="v1.0", DETACH="1", MODE="prepare")
  result = _run(TPU, "--dry-run", "setup", env=env)
  assert result.returncode == 0, result.stderr
  commands = _printed_commands(result.stdout)
  assert all(c[0] == "gcloud" and c[4] == "ssh" for c in commands)  # no tarball, no scp
  clone = _remote_command(commands[0])
  assert "git clone --quiet https://example.org/prvr_jax.git" in clone and "fetch --quiet origin v1.0" in clone
  result = _run(TPU, "run", env=dict(env, DRY_RUN="1"))
  assert result.returncode == 0, result.stderr
  (ssh,) = _printed_commands(result.stdout)
  run = _remote_command(ssh)
  assert "nohup env PRVR_DISTRIBUTED=auto" in run and "--mode=prepare" in run and "prvr_run.log" in run


def test_tpu_delete_status_and_logs_dry_run():
  env = _env(**TPU_ENV, WORKER="2")
  commands = [_printed_commands(_run(TPU, "--dry-run", verb, env=env).stdout)[0] for verb in ("delete", "status", "logs")]
  assert commands[0][4:6] == ["delete", "my-slice"] and "--quiet" in commands[0]
  assert commands[1][4:6] == ["describe", "my-slice"]
  assert commands[2][4] == "ssh" and "--worker=2" in commands[2] and "tail -n 200 -f" in _remote_command(commands[2])


def test_tpu_create_reuses_a_ready_slice_and_creates_a_missing_one(tmp_path):
  ready, missing = tmp_path / "ready", tmp_path / "missing"
  _fake_tool(ready, "gcloud", 'if [[ "$*" == *describe* ]]; then echo READY; fi')
  _fake_tool(missing, "gcloud", 'if [[ "$*" == *describe* ]]; then echo "NOT_FOUND" >&2; exit 1; fi')
  result = _run(TPU, "create", env=_env(**TPU_ENV, PATH=f"{ready}:{os.environ['PATH']}"))
  assert result.returncode == 0, result.stderr
  assert "reusing TPU VM slice my-slice" in result.stderr
  assert [c.split()[3] for c in _calls(ready, "gcloud")] == ["describe"]
  result = _run(TPU, "create", env=_env(**TPU_ENV, PATH=f"{missing}:{os.environ['PATH']}"))
  assert result.returncode == 0, result.stderr
  calls = _calls(missing, "gcloud")
  assert [c.split()[3] for c in calls] == ["describe", "create"]
  assert "--accelerator-type=v5litepod-16" in calls[1] and "--spot" in calls[1]


def test_tpu_usage_errors():
  assert _run(TPU, "--help").returncode == 0
  for argv, message in [((), "missing COMMAND"), (("bogus",), "unknown COMMAND"), (("--nope", "run"), "unknown option"),
                        (("run", "setup"), "one COMMAND only")]:
    result = _run(TPU, "--dry-run", *argv)
    assert result.returncode == 2 and message in result.stderr and "usage:" in result.stderr, argv
  result = _run(TPU, "--dry-run", "run", env=_env(**dict(TPU_ENV, WORKDIR="")))
  assert result.returncode == 2 and "set WORKDIR" in result.stderr
  result = _run(TPU, "--dry-run", "setup", env=_env(**TPU_ENV, REMOTE_DIR=".."))
  assert result.returncode == 2 and "REMOTE_DIR" in result.stderr
  result = _run(TPU, "run", env=_env(**TPU_ENV, GCLOUD="no-such-gcloud"))
  assert result.returncode == 2 and "not found" in result.stderr


# ------------------------------------------------------------------------------------------------
# slurm_gpu.sbatch


def _slurm_env(tmp_path, **extra) -> dict[str, str]:
  env = _env(WORKDIR=str(tmp_path / "work"), REPO_DIR=str(REPO_ROOT), VENV=str(tmp_path / "no-venv"))
  for key in list(env):
    if key.startswith("SLURM_") or key == "PYTHON":
      del env[key]
  env.update(extra)
  return env


def _srun_line(stdout: str) -> list[str]:
  (line,) = [l for l in stdout.splitlines() if l.startswith("srun ")]
  return shlex.split(line)


def test_slurm_header_asks_for_requeue_and_an_early_sigterm():
  header = [l for l in SLURM.read_text().splitlines() if l.startswith("#SBATCH")]
  assert "#SBATCH --requeue" in header and "#SBATCH --gpus-per-task=1" in header
  assert any(l.startswith("#SBATCH --signal=B:TERM@") for l in header)
  assert any(l.startswith("#SBATCH --ntasks-per-node=") for l in header)


def test_slurm_dry_run_prints_srun_with_the_task_layout(tmp_path):
  env = _slurm_env(tmp_path, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="6",
                   CONFIG="configs/tvr.py", EXTRA_ARGS="--config.train.max_steps=7")
  result = _run("bash", SLURM, "--dry-run", "--config.seed=3", env=env)
  assert result.returncode == 0, result.stderr
  assert "layout: 2 node(s) x 4 task(s) per node = 8 processes, 1 GPU and 6 CPUs each" in result.stdout
  assert "PRVR_DISTRIBUTED=auto" in result.stdout and "JAX_LOCAL_DEVICE_IDS=0" in result.stdout
  srun = _srun_line(result.stdout)
  main = srun.index("-m")
  assert {"--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1",
          "--cpus-per-task=6"} <= set(srun[:main])
  assert srun[main - 1] == "python"
  assert srun[main:] == ["-m", "prvr_jax.main", "--config=configs/tvr.py", f"--workdir={tmp_path / 'work'}",
                         "--mode=train", "--config.train.max_steps=7", "--config.seed=3"]
  assert "scontrol requeue" in result.stdout


def test_slurm_dry_run_defaults_to_the_sbatch_header(tmp_path):
  result = _run("bash", SLURM, env=_slurm_env(tmp_path, DRY_RUN="1"))
  assert result.returncode == 0, result.stderr
  assert "layout: 1 node(s) x 8 task(s) per node = 8 processes" in result.stdout
  assert "--ntasks-per-node=8" in _srun_line(result.stdout)
  assert _run("bash", SLURM, "--help").returncode == 0


def _fake_slurm(tmp_path) -> pathlib.Path:
  """Fake srun (runs the task once, in the background, and waits), scancel (signals that task) and
  scontrol (records only)."""
  bin_dir = tmp_path / "bin"
  _fake_tool(bin_dir, "srun", f'while [[ "$1" == --* ]]; do shift; done\n"$@" &\necho $! >"{bin_dir}/task.pid"\n'
                              'wait $!')
  _fake_tool(bin_dir, "scancel", f'kill -TERM "$(cat "{bin_dir}/task.pid")"')
  _fake_tool(bin_dir, "scontrol", "exit 0")
  # The stand-in trainer: prints its environment, saves a "checkpoint" on SIGTERM.
  _fake_tool(bin_dir, "fake_python", textwrap.dedent(f"""\
      echo "task PRVR_DISTRIBUTED=$PRVR_DISTRIBUTED JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS args: $*"
      if [[ "$FAKE_MODE" == exit5 ]]; then exit 5; fi
      if [[ "$FAKE_MODE" == ok ]]; then exit 0; fi
      trap 'echo saved >"{bin_dir}/checkpoint"; exit 0' TERM
      touch "{bin_dir}/started"
      while true; do sleep 0.05; done"""))
  return bin_dir


def test_slurm_sigterm_checkpoints_the_tasks_and_requeues(tmp_path):
  bin_dir = _fake_slurm(tmp_path)
  env = _slurm_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON="fake_python", SLURM_JOB_ID="4242",
                   SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2", SLURM_CPUS_PER_TASK="1", FAKE_MODE="sleep")
  proc = subprocess.Popen(["bash", str(SLURM)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert _wait_until(lambda: (bin_dir / "started").exists(), timeout=20), "the fake task did not start"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, stderr
  assert "task PRVR_DISTRIBUTED=auto JAX_LOCAL_DEVICE_IDS=0 args: -m prvr_jax.main" in stdout
  assert (bin_dir / "checkpoint").read_text().strip() == "saved"
  assert _calls(bin_dir, "scancel") == ["--signal=TERM 4242"]
  assert _calls(bin_dir, "scontrol") == ["requeue 4242"]
  assert "requeueing job 4242" in stderr
  assert "--ntasks-per-node=2" in _calls(bin_dir, "srun")[0]


@pytest.mark.parametrize("mode, code", [("ok", 0), ("exit5", 5)])
def test_slurm_passes_the_exit_code_through_without_requeue(tmp_path, mode, code):
  bin_dir = _fake_slurm(tmp_path)
  env = _slurm_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON="fake_python", SLURM_JOB_ID="7",
                   SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="1", FAKE_MODE=mode)
  result = _run("bash", SLURM, env=env)
  assert result.returncode == code, result.stderr
  assert _calls(bin_dir, "scontrol") == [] and _calls(bin_dir, "scancel") == []


def test_slurm_refuses_to_run_outside_a_job(tmp_path):
  result = _run("bash", SLURM, env=_slurm_env(tmp_path))
  assert result.returncode == 2 and "not inside a SLURM job" in result.stderr


def test_launch_scripts_are_executable_bash_with_strict_mode():
  for script in (LOCAL, TPU, SLURM):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text, script
    assert os.access(script, os.X_OK), script
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# ------------------------------------------------------------------------------------------------
# The real trainer, two processes on this machine.


@pytest.mark.slow
def test_two_processes_give_the_first_losses_of_one_process(tmp_path):
  """jax.distributed on CPU: 2 processes x 1 device, each loading half of every global batch,
  train exactly like 1 process on the whole batch."""
  from tests.train_helpers import run_main, train_lines  # pylint: disable=import-outside-toplevel

  single = run_main(tmp_path / "one", "--config.train.max_steps=3", devices=1)
  assert single.returncode == 0, single.stderr[-3000:]
  pair = run_main(tmp_path / "two", "--config.train.max_steps=3", devices=1,
                  env={"JAX_PLATFORMS": "cpu"}, launcher=[str(LOCAL), "2"], timeout=900)
  assert pair.returncode == 0, (pair.stdout[-3000:], pair.stderr[-3000:])
  for i in range(2):
    assert (tmp_path / "two" / "launch_logs" / f"proc_{i}.log").stat().st_size > 0
  one, two = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
  assert [r["step"] for r in two] == [1, 2, 3]
  for a, b in zip(one, two):
    for key in ("loss", "clip_nce", "tcpl", "cbva", "grad_norm"):
      assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
  # The final evaluation is split over the processes (each encodes half of the videos and
  # queries) and gathered: every query and video counted once, the metrics of one process.
  for split in ("val", "test"):
    e1, e2 = (json.loads((tmp_path / d / f"eval_{split}.json").read_text()) for d in ("one", "two"))
    assert (e2["num_queries"], e2["num_videos"]) == (e1["num_queries"], e1["num_videos"])
    for key in ("SumR", "R@1"):
      assert e2[key] == pytest.approx(e1[key], abs=2.0), (split, key)
