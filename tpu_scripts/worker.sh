#!/usr/bin/env bash
# worker.sh: what runs on each TPU worker. The tpu_scripts do not copy it there: they send its
# text (less comment lines) over `gcloud compute tpus tpu-vm ssh --command` as
#   bash -c '<this text>' eva_worker SUBCOMMAND ARGS...
# Subcommands (paths are relative to the home folder):
#   setup DIR PYTHON INSTALL_PYTHON JAX_VERSION SOURCE EXTRAS
#       make DIR/venv and pip install "jax[tpu]==JAX_VERSION" and eva_jax from SOURCE
#       (git+URL@COMMIT, or a gs://...whl copied with gcloud storage cp).
#   launch DIR [KEY=VALUE ...] -- EVA_ARGS...
#       start `DIR/venv/bin/python -m eva_jax.main EVA_ARGS` in the background, immune to
#       the ssh session's end (SIGHUP ignored, no terminal), appending to DIR/logs/eva_jax.log;
#       its pid goes to DIR/logs/eva_jax.pid and, when it ends, its exit status to
#       DIR/logs/eva_jax.exit ("RC", or "RC sigterm" when every process got SIGTERM: a
#       preemption, or a maintenance event).
#   status DIR
#       print "EVA_STATUS running PID | exited RC [sigterm] | stopped | dead | absent".
#   stop DIR WAIT_S
#       SIGTERM the job (eva_jax saves and exits 0) and wait up to WAIT_S seconds for it.
#
# No single quotes in this file: quoted once more for ssh, it stays readable in --dry_run.
set -euo pipefail
cd "$HOME"
host=${HOSTNAME:-worker}

say() { printf "eva_worker[%s]: %s\n" "$host" "$*"; }

fail() {
  printf "eva_worker[%s]: error: %s\n" "$host" "$*" >&2
  exit 1
}

# The pid in DIR/logs/eva_jax.pid when that process is alive and is our job.
running_pid() {
  local pid
  pid=$(cat "$1/logs/eva_jax.pid" 2> /dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null && grep -qa eva_jax.main "/proc/$pid/cmdline" 2> /dev/null \
    && printf "%s\n" "$pid"
}

job_status() {
  local logs="$1/logs" pid
  if pid=$(running_pid "$1"); then
    echo "running $pid"
  elif [ -f "$logs/eva_jax.stop" ]; then
    echo stopped
  elif [ -f "$logs/eva_jax.exit" ]; then
    echo "exited $(cat "$logs/eva_jax.exit")"
  elif [ -f "$logs/eva_jax.pid" ]; then
    echo dead
  else
    echo absent
  fi
}

cmd_setup() {
  [ $# -eq 6 ] || fail "setup takes DIR PYTHON INSTALL_PYTHON JAX_VERSION SOURCE EXTRAS"
  local dir=$1 python=$2 install_python=$3 jax_version=$4 source=$5 extras=$6 req wheel
  if ! command -v "$python" > /dev/null 2>&1; then
    [ "$install_python" = true ] || fail "$python is not installed (pass --install_python, or another --python)"
    say "installing $python and $python-venv with apt-get"
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$python" "$python-venv"
  fi
  mkdir -p "$dir"
  if [ ! -x "$dir/venv/bin/python" ]; then "$python" -m venv "$dir/venv"; fi
  local pip=("$dir/venv/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade pip
  case $source in
    gs://*)
      mkdir -p "$dir/wheels"
      gcloud storage cp "$source" "$dir/wheels/"
      wheel="$(cd "$dir/wheels" && pwd)/${source##*/}"
      req="$wheel${extras:+[$extras]}"
      ;;
    *) req="eva-jax${extras:+[$extras]} @ $source" ;;
  esac
  say "pip install jax[tpu]==$jax_version $req"
  "${pip[@]}" install -q "jax[tpu]==$jax_version" "$req"
  # The exact commit or wheel, even where the same version number is installed already.
  "${pip[@]}" install -q --force-reinstall --no-deps "$req"
  "$dir/venv/bin/python" -c "import jax, eva_jax; print(jax.__version__, eva_jax.__path__[0])"
  say "set up in ~/$dir/venv"
}

# The job's supervisor, in Python so that waiting survives signals (PEP 475): starts the
# job, writes its pid, waits, and writes its exit status, with " sigterm" added when a
# SIGTERM reached the supervisor too (the whole VM is going down: a preemption).
SUPERVISE="
import signal, subprocess, sys, time
pid_file, exit_file, host = sys.argv[1:4]
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))
job = subprocess.Popen(sys.argv[4:])
with open(pid_file, \"w\") as f:
  f.write(str(job.pid) + chr(10))
rc = job.wait()
rc = 128 - rc if rc < 0 else rc
status = str(rc) + (\" sigterm\" if got else \"\")
with open(exit_file, \"w\") as f:
  f.write(status + chr(10))
print(\"=== eva_jax exited with status\", status, \"on\", host, \"at\",
      time.strftime(\"%Y-%m-%dT%H:%M:%SZ\", time.gmtime()), flush=True)
sys.exit(rc)
"

cmd_launch() {
  [ $# -ge 1 ] || fail "launch takes DIR [KEY=VALUE ...] -- EVA_ARGS..."
  local dir=$1 envs=() logs py pid
  shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    envs+=("$1")
    shift
  done
  [ $# -gt 0 ] && shift
  logs="$dir/logs"
  py="$dir/venv/bin/python"
  [ -x "$py" ] || fail "$HOME/$py is missing: set this worker up first (tpu_scripts/setup.sh)"
  if pid=$(running_pid "$dir"); then
    fail "eva_jax is already running here (pid $pid); stop it first (tpu_scripts/stop.sh)"
  fi
  mkdir -p "$logs"
  rm -f "$logs/eva_jax.exit" "$logs/eva_jax.stop" "$logs/eva_jax.pid"
  printf "=== eva_jax launched on %s at %s: python -m eva_jax.main %s\n" "$host" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >> "$logs/eva_jax.log"
  # nohup: SIGHUP ignored, so the job outlives the ssh session; the venv's python supervises.
  nohup env ${envs[@]+"${envs[@]}"} "$py" -c "$SUPERVISE" "$logs/eva_jax.pid" \
    "$logs/eva_jax.exit" "$host" "$py" -u -m eva_jax.main "$@" >> "$logs/eva_jax.log" 2>&1 < /dev/null &
  # Return once the pid is written, so that a status right after sees the job.
  for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    [ -s "$logs/eva_jax.pid" ] && break
    sleep 0.1
  done
  say "started eva_jax (pid $(cat "$logs/eva_jax.pid" 2> /dev/null)); its log: ~/$logs/eva_jax.log"
}

cmd_status() {
  [ $# -eq 1 ] || fail "status takes DIR"
  echo "EVA_STATUS $(job_status "$1")"
}

cmd_stop() {
  [ $# -eq 2 ] || fail "stop takes DIR WAIT_S"
  local dir=$1 wait_s=$2 pid waited=0
  if ! pid=$(running_pid "$dir"); then
    say "eva_jax is not running here ($(job_status "$dir"))"
    return 0
  fi
  touch "$dir/logs/eva_jax.stop"
  kill -TERM "$pid"
  say "sent SIGTERM to eva_jax (pid $pid); it saves, then exits"
  while kill -0 "$pid" 2> /dev/null; do
    if [ "$waited" -ge "$wait_s" ]; then
      fail "eva_jax (pid $pid) is still running after ${wait_s}s (still saving?); see its log"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  say "eva_jax stopped"
}

sub=${1:-}
[ $# -gt 0 ] && shift
case $sub in
  setup) cmd_setup "$@" ;;
  launch) cmd_launch "$@" ;;
  status) cmd_status "$@" ;;
  stop) cmd_stop "$@" ;;
  *) fail "unknown subcommand \"$sub\" (setup, launch, status or stop)" ;;
esac
