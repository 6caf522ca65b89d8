#!/usr/bin/env bash
# Start N cooperating processes of the trainer on this machine (multi-process JAX on one host).
#
#   launch/local_multiprocess.sh N [ARGS...]        runs N x `python -m prvr_jax.main ARGS...`
#   launch/local_multiprocess.sh N -- COMMAND...    runs N x COMMAND... (any program)
#
# e.g. two processes of two CPU devices each (4 global devices):
#   JAX_NUM_CPU_DEVICES=2 launch/local_multiprocess.sh 2 --config=configs/synthetic.py \
#     --workdir=/tmp/run --mode=train --config.train.max_steps=20
#
# Every process gets the launcher's environment plus
#   PRVR_COORDINATOR_ADDRESS=127.0.0.1:<port>  (the same for all; a free port found at start)
#   PRVR_NUM_PROCESSES=N, PRVR_PROCESS_ID=0..N-1, PYTHONUNBUFFERED=1  (PRVR_DISTRIBUTED is unset)
# from which prvr_jax.main calls jax.distributed.initialize(...). Process i's stdout and stderr go
# to <logdir>/proc_<i>.log and are streamed here prefixed with "[proc i] ".
#
# Fail fast: as soon as one process exits non-zero, the others are stopped (SIGTERM to their
# process groups, SIGKILL after the grace period), the failed process, its exit code and the tail
# of its log are printed, and the launcher exits with that code. Ctrl-C (SIGINT), SIGTERM or SIGHUP
# to the launcher stops all processes the same way (a second Ctrl-C kills them at once). The
# launcher exits 0 only when every process exited 0.
#
# Settings (environment variables, with their defaults):
#   PYTHON                         python interpreter for the module     `python`, else `python3`
#   PRVR_LAUNCH_MODULE             module run with `PYTHON -m` when no `--` COMMAND is given
#                                                                         prvr_jax.main
#   PRVR_LAUNCH_LOGDIR             folder of the proc_<i>.log files      <workdir>/launch_logs when
#                                  a local --workdir is among ARGS, else a new ${TMPDIR:-/tmp}/prvr_launch.XXXXXX
#   PRVR_LAUNCH_PORT               coordinator port                       a free port of 127.0.0.1
#   PRVR_LAUNCH_STREAM             1: stream the prefixed output here; 0: only write the logs    1
#   PRVR_LAUNCH_GRACE              seconds between SIGTERM and SIGKILL when stopping              10
#   PRVR_LAUNCH_TAIL               lines of the failed process's log shown                        30
#   PRVR_LAUNCH_GPUS_PER_PROCESS   if set to G, process i gets CUDA_VISIBLE_DEVICES = its own G
#                                  GPUs (i*G .. i*G+G-1); unset: every process sees all GPUs   unset
#   JAX_NUM_CPU_DEVICES            (read by JAX) CPU devices per process, passed through       unset
#
# Needs bash >= 4 and a POSIX userland (awk, tee, tail); no other tools.
set -euo pipefail

readonly PROG="${0##*/}"

usage() {
  cat <<EOF
usage: $PROG [-h|--help] N [ARGS... | -- COMMAND...]

Starts N processes of \`\${PYTHON:-python} -m \${PRVR_LAUNCH_MODULE:-prvr_jax.main} ARGS...\` (or of
COMMAND... after --) with PRVR_COORDINATOR_ADDRESS, PRVR_NUM_PROCESSES and PRVR_PROCESS_ID set,
logs each to <logdir>/proc_<i>.log, and stops all of them as soon as one fails.

  N          number of processes, a positive integer
  ARGS       arguments of the module, e.g. --config=configs/synthetic.py --workdir=DIR --mode=train
  COMMAND    any program and its arguments instead of the module

Settings (environment): PYTHON, PRVR_LAUNCH_MODULE, PRVR_LAUNCH_LOGDIR, PRVR_LAUNCH_PORT,
PRVR_LAUNCH_STREAM, PRVR_LAUNCH_GRACE, PRVR_LAUNCH_TAIL, PRVR_LAUNCH_GPUS_PER_PROCESS,
JAX_NUM_CPU_DEVICES; see the top of $0.
EOF
}

die_usage() {
  echo "$PROG: error: $1" >&2
  usage >&2
  exit 2
}

log() { echo "$PROG: $*" >&2; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# ---------------------------------------------------------------------------------------------
# Arguments and settings.
if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
  usage
  exit 0
fi
[[ $# -ge 1 ]] || die_usage "missing N (the number of processes)"
[[ "$1" =~ ^[1-9][0-9]*$ ]] || die_usage "N must be a positive integer, got '$1'"
readonly NUM_PROCESSES="$1"
shift

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
MODULE="${PRVR_LAUNCH_MODULE:-prvr_jax.main}"
STREAM="${PRVR_LAUNCH_STREAM:-1}"
GRACE="${PRVR_LAUNCH_GRACE:-10}"
TAIL_LINES="${PRVR_LAUNCH_TAIL:-30}"
GPUS_PER_PROCESS="${PRVR_LAUNCH_GPUS_PER_PROCESS:-}"
is_uint "$GRACE" || die_usage "PRVR_LAUNCH_GRACE must be a whole number of seconds, got '$GRACE'"
is_uint "$TAIL_LINES" || die_usage "PRVR_LAUNCH_TAIL must be a whole number, got '$TAIL_LINES'"
[[ "$STREAM" == 0 || "$STREAM" == 1 ]] || die_usage "PRVR_LAUNCH_STREAM must be 0 or 1, got '$STREAM'"
if [[ -n "$GPUS_PER_PROCESS" ]]; then
  [[ "$GPUS_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] ||
    die_usage "PRVR_LAUNCH_GPUS_PER_PROCESS must be a positive integer, got '$GPUS_PER_PROCESS'"
fi

if [[ $# -ge 1 && "$1" == "--" ]]; then
  shift
  [[ $# -ge 1 ]] || die_usage "no COMMAND after --"
  COMMAND=("$@")
else
  COMMAND=("$PYTHON" -m "$MODULE" "$@")
fi

# The log folder: explicit, else <workdir>/launch_logs for a local --workdir, else a new temp dir.
LOGDIR="${PRVR_LAUNCH_LOGDIR:-}"
if [[ -z "$LOGDIR" ]]; then
  workdir=""
  prev=""
  for arg in "${COMMAND[@]}"; do
    case "$arg" in
      --workdir=*) workdir="${arg#--workdir=}" ;;
      *) [[ "$prev" == "--workdir" ]] && workdir="$arg" ;;
    esac
    prev="$arg"
  done
  if [[ -n "$workdir" && "$workdir" != *://* ]]; then
    LOGDIR="$workdir/launch_logs"
  else
    LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/prvr_launch.XXXXXX")"
  fi
fi
mkdir -p "$LOGDIR"

PORT="${PRVR_LAUNCH_PORT:-}"
if [[ -z "$PORT" ]]; then
  # Bind port 0 and report what the kernel chose; it is free again once the snippet exits.
  PORT="$("$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')" || { log "error: could not find a free port with $PYTHON"; exit 2; }
fi
is_uint "$PORT" || die_usage "PRVR_LAUNCH_PORT must be a port number, got '$PORT'"
readonly COORDINATOR="127.0.0.1:$PORT"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping. Each process runs in its own process group (job control is on while they
# start), whose id is the pid in PIDS; killing the group also reaches the program's children.
PIDS=()
RUNNING=()   # 1 while process i has not been reaped
STOPPING=0

# stop_all: SIGTERM every process group, SIGKILL (by a watchdog) what is left after GRACE seconds.
# Waits for every process; a process that handles SIGTERM (e.g. saves a checkpoint) may finish.
stop_all() {
  local pid watchdog
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  set -m
  (
    sleep "$GRACE"
    log "processes still running ${GRACE}s after SIGTERM: sending SIGKILL"
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  ) </dev/null &
  watchdog=$!
  set +m
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  kill -KILL -- "-$watchdog" 2>/dev/null || true
  wait "$watchdog" 2>/dev/null || true
  # Anything a program left behind in its process group.
  for pid in "${PIDS[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}

on_signal() {
  local sig="$1" code="$2"
  if (( STOPPING )); then
    log "received SIG$sig again: killing all processes now"
    local pid
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    exit "$code"
  fi
  STOPPING=1
  log "received SIG$sig: stopping all ${#PIDS[@]} processes (SIGTERM, SIGKILL after ${GRACE}s)"
  stop_all
  log "stopped; logs are in $LOGDIR"
  exit "$code"
}

on_exit() {
  # Whatever ends the launcher (an error included) leaves no process behind.
  local pid
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP
trap on_exit EXIT

# ---------------------------------------------------------------------------------------------
# Start.
log "starting $NUM_PROCESSES processes: ${COMMAND[*]}"
log "coordinator $COORDINATOR, logs in $LOGDIR"
unset PRVR_DISTRIBUTED
export PRVR_COORDINATOR_ADDRESS="$COORDINATOR" PRVR_NUM_PROCESSES="$NUM_PROCESSES" PYTHONUNBUFFERED=1

set -m
for ((i = 0; i < NUM_PROCESSES; i++)); do
  logfile="$LOGDIR/proc_$i.log"
  (
    set +e
    # Caught (not ignored), so the program started below gets the default dispositions; this shell
    # stays to report the program's exit code while the program shuts down.
    trap ':' INT TERM HUP
    export PRVR_PROCESS_ID="$i"
    if [[ -n "$GPUS_PER_PROCESS" ]]; then
      first=$((i * GPUS_PER_PROCESS))
      gpus="$first"
      for ((g = first + 1; g < first + GPUS_PER_PROCESS; g++)); do gpus="$gpus,$g"; done
      export CUDA_VISIBLE_DEVICES="$gpus"
    fi
    if [[ "$STREAM" == 1 ]]; then
      # tee and awk ignore SIGINT/SIGTERM so that what the program prints while it shuts down
      # (e.g. "checkpoint saved") still reaches the log; they end when the program's output closes.
      "${COMMAND[@]}" 2>&1 |
        { trap '' INT TERM; tee "$logfile"; } |
        { trap '' INT TERM; awk -v p="[proc $i] " '{ print p $0; fflush() }'; }
      exit "${PIPESTATUS[0]}"
    else
      exec "${COMMAND[@]}" >"$logfile" 2>&1
    fi
  ) </dev/null 2>/dev/null &  # (stderr: only this shell's own "Terminated" notices)
  PIDS+=("$!")
  RUNNING+=(1)
done
set +m

# ---------------------------------------------------------------------------------------------
# Wait: poll the processes (bash reaps finished children itself, `wait PID` then gives the code).
remaining="$NUM_PROCESSES"
while (( remaining > 0 )); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    (( RUNNING[i] )) || continue
    pid="${PIDS[i]}"
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    RUNNING[i]=0
    remaining=$((remaining - 1))
    if (( code != 0 )); then
      STOPPING=1
      log "process $i (pid $pid) exited with code $code; stopping the other $remaining running process(es)"
      stop_all
      {
        echo "$PROG: FAILED: process $i of $NUM_PROCESSES exited with code $code. Last $TAIL_LINES lines of $LOGDIR/proc_$i.log:"
        tail -n "$TAIL_LINES" "$LOGDIR/proc_$i.log" | sed 's/^/    /'
        echo "$PROG: FAILED: process $i exited with code $code (logs in $LOGDIR)"
      } >&2
      exit "$code"
    fi
    log "process $i finished (exit code 0)"
  done
  if (( remaining > 0 )); then sleep 0.2; fi
done
log "all $NUM_PROCESSES processes finished successfully; logs in $LOGDIR"
