#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a multi-host pod slice) with gcloud.
#
#   launch/tpu_pod.sh [--dry-run] COMMAND [-- ARGS...]
#
# Commands:
#   create   create the TPU VM slice, or reuse it when `describe` finds it
#   setup    copy the code to every worker (a tarball of the local git HEAD, or `git clone
#            REPO_URL`), then install requirements.txt and the TPU jax wheel in a venv on every worker
#   run      run `python -m prvr_jax.main --config=CONFIG --workdir=WORKDIR --mode=MODE EXTRA_ARGS
#            ARGS...` on every worker at once with PRVR_DISTRIBUTED=auto (JAX finds the slice's
#            hosts itself); training resumes from WORKDIR's checkpoints
#   logs     show the log of a DETACH=1 run on worker WORKER (tail -f)
#   status   describe the slice
#   delete   delete the slice
#   all      create, setup and run
#
# e.g.  TPU_NAME=prvr-v4 WORKDIR=gs://my-bucket/prvr/tvr CONFIG=configs/tvr.py \
#         EXTRA_ARGS="--config.data.root=/mnt/data/prvr" launch/tpu_pod.sh all
#       MODE=prepare launch/tpu_pod.sh run     # build the dataset first (one mode per run)
#       launch/tpu_pod.sh --dry-run all        # print every gcloud command instead of running it
#
# Settings (environment variables, with their defaults):
#   TPU_NAME              name of the TPU VM slice                                     prvr-tpu
#   ZONE                  zone of the slice                                       us-central2-b
#   ACCELERATOR_TYPE      slice type: v4-8 (1 host), v4-32 (4 hosts), v5litepod-16, ...   v4-32
#   RUNTIME_VERSION       TPU VM software version: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite
#                         for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e
#                                                                            tpu-ubuntu2204-base
#   PROJECT               Google Cloud project (empty: gcloud's configured project)        empty
#   SPOT                  1: create a Spot slice (cheaper, may be preempted; `run` again
#                         after re-creating it resumes from WORKDIR)                         0
#   REPO_URL              git URL cloned on every worker; empty: copy the local git HEAD
#                         (committed files only) as a tarball                              empty
#   REPO_REF              branch, tag or commit checked out from REPO_URL (empty: default branch)
#   REMOTE_DIR            code folder on the workers (relative to the home folder)      prvr_jax
#   REMOTE_PYTHON         python on the workers, installed with apt when missing (the pinned
#                         requirements need Python >= 3.11)                            python3.11
#   REMOTE_VENV           virtual environment on the workers (relative to home)       prvr_venv
#   JAX_TPU_REQUIREMENT   the TPU jax wheel, installed after requirements.txt   jax[tpu]==0.10.2
#   WORKDIR               run folder shared by all workers: a gs:// path or a shared mount
#                         (checkpoints of every host must land in the same place)  required for run
#   CONFIG                config file                                       configs/synthetic.py
#   MODE                  prepare | train | eval                                          train
#   EXTRA_ARGS            more flags for prvr_jax.main (split on spaces), e.g.
#                         "--config.train.max_steps=1000"; ARGS after `--` are appended   empty
#   DETACH                1: `run` starts the job with nohup and returns (see `logs`); 0: `run`
#                         streams every worker's output and ends with the job               0
#   REMOTE_LOG            log file of a DETACH=1 run on each worker (relative to home) prvr_run.log
#   WORKER                worker whose log `logs` shows                                        0
#   GCLOUD                gcloud executable                                              gcloud
#   DRY_RUN               1: same as --dry-run                                                0
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

TPU_NAME="${TPU_NAME:-prvr-tpu}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-0}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
REMOTE_DIR="${REMOTE_DIR:-prvr_jax}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3.11}"
REMOTE_VENV="${REMOTE_VENV:-prvr_venv}"
JAX_TPU_REQUIREMENT="${JAX_TPU_REQUIREMENT:-jax[tpu]==0.10.2}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/synthetic.py}"
MODE="${MODE:-train}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
DETACH="${DETACH:-0}"
REMOTE_LOG="${REMOTE_LOG:-prvr_run.log}"
WORKER="${WORKER:-0}"
GCLOUD="${GCLOUD:-gcloud}"
DRY_RUN="${DRY_RUN:-0}"

usage() {
  cat <<EOF
usage: $PROG [-h|--help] [--dry-run] COMMAND [-- ARGS...]

Commands: create | setup | run | logs | status | delete | all (= create, setup, run).
  --dry-run   print every gcloud (and local git) command instead of running it
  ARGS        extra flags appended to the prvr_jax.main command line of \`run\` / \`all\`

Settings come from environment variables (TPU_NAME, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION,
PROJECT, SPOT, REPO_URL, REPO_REF, REMOTE_DIR, REMOTE_PYTHON, REMOTE_VENV, JAX_TPU_REQUIREMENT,
WORKDIR, CONFIG, MODE, EXTRA_ARGS, DETACH, REMOTE_LOG, WORKER, GCLOUD, DRY_RUN); their meaning
and defaults are listed at the top of $0.
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }
log() { echo "$PROG: $*" >&2; }

# q WORD: WORD quoted for a POSIX shell (bare when it has no special characters).
q() {
  local s="$1" sq="'"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$sq\\$sq$sq}"
  fi
}

# qjoin WORDS...: the words quoted and joined with spaces (one shell command line).
qjoin() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

# rpath PATH: PATH for a remote command; relative paths (and ~/...) are made relative to the remote
# home so they work after a `cd`.
rpath() {
  local path="${1#"~/"}"
  if [[ "$path" == /* ]]; then
    q "$path"
  else
    # shellcheck disable=SC2016  # $HOME is expanded by the remote shell
    printf '"$HOME"/%s' "$(q "$path")"
  fi
}

# run_cmd CMD...: print the command (stdout under --dry-run, else stderr) and run it unless dry.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(qjoin "$@")"
  else
    echo "+ $(qjoin "$@")" >&2
    "$@"
  fi
}

gcloud_tpu() {  # gcloud_tpu VERB ARGS...: gcloud compute tpus tpu-vm VERB ARGS... --zone --project
  local verb="$1"
  shift
  local extra=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then extra+=(--project="$PROJECT"); fi
  run_cmd "$GCLOUD" compute tpus tpu-vm "$verb" "$@" "${extra[@]}"
}

on_all_workers() {  # on_all_workers REMOTE_COMMAND_LINE
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

# ---------------------------------------------------------------------------------------------
cmd_create() {
  local state=""
  if [[ "$DRY_RUN" == 1 ]]; then
    gcloud_tpu describe "$TPU_NAME" --format='value(state)'
    log "(dry run: assuming the slice does not exist yet)"
  else
    # The state, or nothing when the slice does not exist (describe fails).
    state="$(gcloud_tpu describe "$TPU_NAME" --format='value(state)')" || state=""
  fi
  if [[ -n "$state" ]]; then
    case "$state" in
      READY) log "reusing TPU VM slice $TPU_NAME ($ZONE), state READY" ;;
      PREEMPTED | TERMINATED | STOPPED)
        die "slice $TPU_NAME exists in state $state; delete it ($PROG delete) and create it again" ;;
      *) log "slice $TPU_NAME exists in state $state; reusing it (commands may fail until it is READY)" ;;
    esac
    return 0
  fi
  local create=("$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then create+=(--spot); fi
  gcloud_tpu create "${create[@]}"
}

copy_local_head() {
  local tarball remote_tar="prvr_jax_src.tar.gz"
  if [[ "$DRY_RUN" != 1 ]] && [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    log "warning: uncommitted changes in $REPO_ROOT are NOT copied (only the git HEAD is)"
  fi
  tarball="${TMPDIR:-/tmp}/prvr_jax_src.$$.tar.gz"
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
  gcloud_tpu scp "$tarball" "$TPU_NAME:$remote_tar" --worker=all
  if [[ "$DRY_RUN" != 1 ]]; then rm -f "$tarball"; fi
  local dir
  dir="$(rpath "$REMOTE_DIR")"
  on_all_workers "rm -rf $dir && mkdir -p $dir && tar -xzf $(q "$remote_tar") -C $dir && rm -f $(q "$remote_tar")"
}

clone_repo() {
  local dir update
  dir="$(rpath "$REMOTE_DIR")"
  if [[ -n "$REPO_REF" ]]; then
    update="git -C $dir fetch --quiet origin $(q "$REPO_REF") && git -C $dir checkout --quiet FETCH_HEAD"
  else
    update="git -C $dir pull --quiet --ff-only"
  fi
  on_all_workers "if [ -d $dir/.git ]; then $update; else git clone --quiet $(q "$REPO_URL") $dir && { $update; }; fi"
}

cmd_setup() {
  if [[ -n "$REPO_URL" ]]; then clone_repo; else copy_local_head; fi
  local dir venv py
  dir="$(rpath "$REMOTE_DIR")"
  venv="$(rpath "$REMOTE_VENV")"
  py="$(q "$REMOTE_PYTHON")"
  local steps=(
    "{ command -v $py >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $py $(q "$REMOTE_PYTHON-venv"); }; }"
    "{ [ -x $venv/bin/python ] || $py -m venv $venv; }"
    "$venv/bin/python -m pip install --quiet --upgrade pip"
    "$venv/bin/python -m pip install --quiet -r $dir/requirements.txt"
    "$venv/bin/python -m pip install --quiet $(q "$JAX_TPU_REQUIREMENT")"
    "$venv/bin/python -c 'import jax; print(\"jax\", jax.__version__)'"
  )
  local joined="" s
  for s in "${steps[@]}"; do joined+="${joined:+ && }$s"; done
  on_all_workers "$joined"
}

cmd_run() {
  [[ -n "$WORKDIR" ]] || die "set WORKDIR to a run folder every worker shares (e.g. gs://BUCKET/prvr/run1)"
  local extra=()
  if [[ -n "$EXTRA_ARGS" ]]; then read -r -a extra <<<"$EXTRA_ARGS"; fi
  local dir venv main
  dir="$(rpath "$REMOTE_DIR")"
  venv="$(rpath "$REMOTE_VENV")"
  main="env PRVR_DISTRIBUTED=auto $venv/bin/python $(qjoin -m prvr_jax.main --config="$CONFIG" \
    --workdir="$WORKDIR" --mode="$MODE" ${extra[@]+"${extra[@]}"} ${RUN_ARGS[@]+"${RUN_ARGS[@]}"})"
  if [[ "$DETACH" == 1 ]]; then
    local remote_log
    remote_log="$(rpath "$REMOTE_LOG")"
    on_all_workers "cd $dir && nohup $main >$remote_log 2>&1 </dev/null & echo started on \$(hostname), log: $remote_log"
    log "started; follow worker $WORKER with: WORKER=$WORKER $0 logs"
  else
    on_all_workers "cd $dir && $main"
  fi
}

cmd_logs() {
  [[ "$WORKER" =~ ^[0-9]+$ ]] || die "WORKER must be a worker number, got '$WORKER'"
  gcloud_tpu ssh "$TPU_NAME" --worker="$WORKER" --command="tail -n 200 -f $(rpath "$REMOTE_LOG")"
}

# ---------------------------------------------------------------------------------------------
COMMAND=""
RUN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; RUN_ARGS=("$@"); break ;;
    -*) echo "$PROG: error: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    *)
      if [[ -n "$COMMAND" ]]; then
        echo "$PROG: error: one COMMAND only (got '$COMMAND' and '$1'); flags for the trainer go after --" >&2
        usage >&2
        exit 2
      fi
      COMMAND="$1"
      ;;
  esac
  shift
done
[[ -n "$COMMAND" ]] || { echo "$PROG: error: missing COMMAND" >&2; usage >&2; exit 2; }
[[ "$DRY_RUN" == 0 || "$DRY_RUN" == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
case "$REMOTE_DIR" in
  "" | . | .. | / | \~ | \~/ | */.. | ../* | */../*) die "REMOTE_DIR must name a folder of its own (it is replaced by setup), got '$REMOTE_DIR'" ;;
esac
[[ -n "$REMOTE_VENV" && -n "$REMOTE_LOG" ]] || die "REMOTE_VENV and REMOTE_LOG must not be empty"
case "$MODE" in prepare | train | eval) ;; *) die "MODE must be prepare, train or eval, got '$MODE'" ;; esac
if [[ "$DRY_RUN" != 1 ]] && ! command -v "$GCLOUD" >/dev/null 2>&1; then
  die "'$GCLOUD' not found: install the Google Cloud CLI (or use --dry-run)"
fi

case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run ;;
  logs) cmd_logs ;;
  status) gcloud_tpu describe "$TPU_NAME" ;;
  delete) gcloud_tpu delete "$TPU_NAME" --quiet ;;
  all)
    [[ -n "$WORKDIR" ]] || die "set WORKDIR to a run folder every worker shares (e.g. gs://BUCKET/prvr/run1)"
    cmd_create
    cmd_setup
    cmd_run
    ;;
  *) echo "$PROG: error: unknown COMMAND '$COMMAND'" >&2; usage >&2; exit 2 ;;
esac
