# shellcheck shell=bash disable=SC2154
# (SC2154: the flags' values, F_name, are assigned by flag() and _parse_args() with eval.)
# common.sh: what the tpu_scripts share: flag parsing (--name=value, --help, --flagfile,
# --dry_run), shell quoting, the gcloud wrapper and the steps themselves (create, set up,
# launch, logs, stop, delete, resume). Sourced by the scripts beside it; not run by itself.
#
# Written for bash 3.2 too (macOS's /bin/bash): no associative arrays, namerefs or mapfile,
# and every possibly-empty array is expanded as ${a[@]+"${a[@]}"} (set -u).
#
# gcloud facts, and what backs them:
#  * verified against the gcloud CLI's own help and argument parser (Google Cloud SDK 528):
#    `compute tpus queued-resources create NAME --node-id --zone --project --accelerator-type
#    --runtime-version [--spot] [--reserved] [--service-account] [--scopes]`,
#    `queued-resources describe`, `queued-resources delete --force` (also deletes the
#    queued resource's nodes) and `--quiet`, `tpu-vm ssh --worker=all|N --command`,
#    `tpu-vm describe`, and the format projections `value(state.state)` and
#    `value(networkEndpoints.len())` (the .len() transform, tried on local data); with
#    EVA_JAX_TEST_REAL_GCLOUD=1,
#    tests/tpu_scripts/test_scripts.py runs each kind of command these scripts print
#    through that parser.
#  * verified in the Cloud TPU API reference: a queued resource's state.state is one of
#    CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, SUSPENDING,
#    SUSPENDED, DELETING; a node's networkEndpoints has one entry per TPU worker (host).
#  * verified in the Cloud TPU docs (TPU software versions): runtime versions for JAX are
#    v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5e) and
#    tpu-ubuntu2204-base (v4 and older).
#  * assumed, not verified (nobody here has a TPU): that `describe` of a missing queued
#    resource fails with a message containing NOT_FOUND (or "not found"); that these
#    runtime images are Ubuntu 22.04 with the gcloud CLI installed and python3.11 in apt;
#    that gcloud hands --command to the remote login shell unchanged.
#  * the job's processes find each other by themselves: eva_jax.main calls
#    jax.distributed.initialize() with no arguments on a Cloud TPU VM, and JAX reads the
#    process index, count and coordinator from the TPU VM's metadata. So no JAX_* variable
#    is set here (eva_jax.main refuses JAX_COORDINATOR_ADDRESS without JAX_NUM_PROCESSES and
#    JAX_PROCESS_ID).

set -euo pipefail

SCRIPT=${0##*/}
_FLAG_NAMES=()

# ------------------------------------------------------------------ messages

info() { printf '%s: %s\n' "$SCRIPT" "$*" >&2; }

die() {
  printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
  exit 1
}

usage_error() {
  printf '%s: error: %s\n(%s --help lists every flag.)\n' "$SCRIPT" "$*" "$SCRIPT" >&2
  exit 2
}

# ------------------------------------------------------------------ flags

# flag NAME DEFAULT HELP [str|bool|list|required]: declares --NAME; its value is $F_NAME (an
# array for a list flag).
flag() {
  local name=$1 default=$2 help=$3 kind=${4:-str}
  _FLAG_NAMES+=("$name")
  eval "_FKIND_$name=\$kind; _FDEF_$name=\$default; _FHELP_$name=\$help"
  if [ "$kind" = list ]; then
    eval "F_$name=()"
  else
    eval "F_$name=\$default"
  fi
}

# flag_alias ALIAS NAME: --ALIAS is another spelling of --NAME.
flag_alias() { eval "_FALIAS_$1=\$2"; }

# The script's description: its leading comment block, less the #! line.
_description() {
  local line
  while IFS= read -r line; do
    case $line in
      '#!'*) continue ;;
      '#') printf '\n' ;;
      '# '*) printf '%s\n' "${line#\# }" ;;
      *) return 0 ;;
    esac
  done < "$0"
}

usage() {
  local name kind default help spec note
  printf 'Usage: %s [--flag=value ...]\n\n' "$SCRIPT"
  _description
  printf '\nFlags (--flag=value or --flag value; dashes and underscores are the same):\n'
  for name in "${_FLAG_NAMES[@]}"; do
    eval "kind=\$_FKIND_$name; default=\$_FDEF_$name; help=\$_FHELP_$name"
    case $kind in
      bool) spec="--${name}[=true|false]"; note="default: $default" ;;
      list) spec="--$name=VALUE"; note="repeatable; default: none" ;;
      required) spec="--$name=VALUE"; note="required" ;;
      *) spec="--$name=VALUE"; note="default: ${default:-empty}" ;;
    esac
    printf '  %s\n      %s (%s)\n' "$spec" "$help" "$note"
  done
  printf '  --flagfile=FILE\n      more flags from FILE, one --flag=value a line, no shell quoting, # comments; flags of the other tpu_scripts are ignored there, so one file serves them all (default: none)\n'
  printf '  --help\n      this text\n'
}

# Every flag name any tpu_script declares (a flagfile may hold flags for the other scripts).
_all_flag_names() {
  (
    flag() { printf '%s\n' "$1"; }
    flag_alias() { printf '%s\n' "$1"; }
    define_common_flags; define_create_flags; define_worker_flags; define_setup_flags
    define_launch_flags; define_logs_flags; define_stop_flags; define_resume_flags
  )
}

_parse_flagfile() {
  local file=$1 line lines=()
  [ -f "$file" ] || usage_error "--flagfile=$file: no such file"
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line#"${line%%[![:space:]]*}"}
    line=${line%"${line##*[![:space:]]}"}
    case $line in '' | '#'*) continue ;; --*) ;; *) usage_error "$file: '$line' is not a flag (one --flag=value a line)" ;; esac
    lines+=("$line")
  done < "$file"
  _parse_args 1 ${lines[@]+"${lines[@]}"}
}

# _parse_args LENIENT ARGS...: LENIENT=1 (a flagfile) skips flags other scripts declare.
_parse_args() {
  local lenient=$1 arg body name value has_value kind target all re='^[a-z][a-z0-9_]*$'
  shift
  while [ $# -gt 0 ]; do
    arg=$1
    shift
    case $arg in
      -h | --help | -help) usage; exit 0 ;;
      --*) ;;
      *) usage_error "unexpected argument '$arg': every flag is --flag=value" ;;
    esac
    body=${arg#--}
    if [[ $body == *=* ]]; then
      name=${body%%=*} value=${body#*=} has_value=1
    else
      name=$body value="" has_value=0
    fi
    name=${name//-/_}
    [[ $name =~ $re ]] || usage_error "unknown flag --$name"
    eval "target=\${_FALIAS_$name-}"
    if [ -n "$target" ]; then name=$target; fi
    if [ "$name" = flagfile ]; then
      if [ "$has_value" = 0 ]; then
        [ $# -gt 0 ] || usage_error "--flagfile needs a value (--flagfile=FILE)"
        value=$1
        shift
      fi
      _parse_flagfile "$value"
      continue
    fi
    eval "kind=\${_FKIND_$name-}"
    if [ -z "$kind" ]; then
      if [ "$lenient" = 1 ]; then
        all=$'\n'$(_all_flag_names)$'\n'
        case $all in *$'\n'"$name"$'\n'*) continue ;; esac
      fi
      usage_error "unknown flag --$name"
    fi
    if [ "$kind" = bool ]; then
      if [ "$has_value" = 0 ]; then value=true; fi
      case $value in
        true | 1 | yes) value=true ;;
        false | 0 | no) value=false ;;
        *) usage_error "--$name is true or false, not '$value'" ;;
      esac
      eval "F_$name=\$value"
      continue
    fi
    if [ "$has_value" = 0 ]; then
      if [ $# -eq 0 ] || [[ $1 == --* ]]; then usage_error "--$name needs a value (--$name=VALUE)"; fi
      value=$1
      shift
    fi
    if [ "$kind" = list ]; then
      eval "F_$name+=(\"\$value\")"
    else
      eval "F_$name=\$value"
    fi
  done
}

# parse_flags "$@": sets every F_name, checks the required ones, and (unless --dry_run) that
# gcloud is installed.
parse_flags() {
  local name kind value help
  _parse_args 0 "$@"
  for name in "${_FLAG_NAMES[@]}"; do
    eval "kind=\$_FKIND_$name; help=\$_FHELP_$name"
    if [ "$kind" = required ]; then
      eval "value=\$F_$name"
      [ -n "$value" ] || usage_error "missing required flag --$name ($help)"
    fi
  done
  if [ "$F_dry_run" != true ]; then require_gcloud; fi
}

require_gcloud() {
  command -v gcloud > /dev/null 2>&1 || die "gcloud (the Google Cloud CLI) is not on PATH." \
    "Install it (https://cloud.google.com/sdk/docs/install), run 'gcloud auth login', and" \
    "run this again; or pass --dry_run to only print the gcloud commands."
}

need_int() { # need_int FLAG VALUE [MIN]
  local re='^[0-9]+$'
  [[ $2 =~ $re ]] && [ "$2" -ge "${3:-0}" ] || usage_error "--$1 is a whole number >= ${3:-0}, not '$2'"
}

# ------------------------------------------------------------------ quoting

# shq WORD: WORD quoted for a POSIX shell (bash, dash, zsh): as it is when it is made of
# characters no shell treats specially; else in single quotes; or, when it holds single
# quotes but nothing that double quotes leave special ($ ` " \ !), in double quotes (a gin
# binding such as SOLVER = 'gs://b/m' reads better so); else in single quotes with each '
# written '\''.
shq() {
  local s=$1 q="'" out rest re='^[A-Za-z0-9_./:@%+,-][A-Za-z0-9_./:=@%+,-]*$'
  if [[ $s =~ $re ]]; then
    printf '%s' "$s"
    return
  fi
  case $s in
    *"$q"*) ;;
    *)
      printf "'%s'" "$s"
      return
      ;;
  esac
  case $s in
    *[\$\`\"\\!]*) ;;
    *)
      printf '"%s"' "$s"
      return
      ;;
  esac
  out="'" rest=$s
  while [[ $rest == *"$q"* ]]; do
    out+="${rest%%"$q"*}'\\''"
    rest=${rest#*"$q"}
  done
  printf '%s' "$out$rest'"
}

# shq_join WORDS...: the words quoted and joined by spaces: one command line.
shq_join() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shq "$a")"; done
  printf '%s' "$out"
}

# display_cmd WORDS...: like shq_join, but --flag=value shows as --flag='value'.
display_cmd() {
  local out="" a re='^--[A-Za-z0-9_-]+='
  for a in "$@"; do
    if [[ $a =~ $re ]]; then
      out+="${out:+ }${a%%=*}=$(shq "${a#*=}")"
    else
      out+="${out:+ }$(shq "$a")"
    fi
  done
  printf '%s\n' "$out"
}

# ------------------------------------------------------------------ gcloud

# gcloud_run ARGS...: runs gcloud ARGS (saying so on stderr), or with --dry_run prints it.
gcloud_run() {
  local line
  line=$(display_cmd gcloud "$@")
  if [ "$F_dry_run" = true ]; then
    printf '%s\n' "$line"
    return 0
  fi
  if [ ${#line} -gt 400 ]; then
    line="${line:0:300} ... (${#line} characters; --dry_run prints it whole)"
  fi
  info "running: $line"
  gcloud "$@"
}

# The script every worker runs (tpu_scripts/worker.sh), less its comment lines, sent as
# `bash -c SCRIPT eva_worker SUBCOMMAND ARGS...` so that nothing has to be copied first.
worker_script() {
  local line out=""
  while IFS= read -r line || [ -n "$line" ]; do
    case ${line#"${line%%[![:space:]]*}"} in '' | '#'*) continue ;; esac
    out+="$line"$'\n'
  done < "$TPU_SCRIPTS_DIR/worker.sh"
  printf '%s' "$out"
}

# remote_command SUBCOMMAND ARGS...: the --command that runs worker.sh SUBCOMMAND ARGS.
remote_command() { printf 'bash -c %s eva_worker %s' "$(shq "$(worker_script)")" "$(shq_join "$@")"; }

# ssh_worker WORKER COMMAND: runs COMMAND (a shell command line) on WORKER (N or all).
ssh_worker() {
  gcloud_run compute tpus tpu-vm ssh "$F_name" --zone="$F_zone" --project="$F_project" \
    --worker="$1" --command="$2"
}

# qr_describe: sets QR_DESCRIBE to the gcloud arguments that print the queued resource's state.
qr_describe() {
  QR_DESCRIBE=(compute tpus queued-resources describe "$F_name" --project="$F_project"
    --zone="$F_zone" --format='value(state.state)')
}

# qr_state: sets QR_STATE to the queued resource's state, or NOT_FOUND; returns 1 (gcloud's
# message shown) when gcloud fails otherwise.
qr_state() {
  local err out rc=0
  qr_describe
  err=$(mktemp)
  out=$(gcloud "${QR_DESCRIBE[@]}" 2> "$err") || rc=$?
  if [ "$rc" = 0 ]; then
    QR_STATE=${out//[[:space:]]/}
    rm -f "$err"
    return 0
  fi
  if grep -qi -e NOT_FOUND -e 'not found' "$err"; then
    QR_STATE=NOT_FOUND
    rm -f "$err"
    return 0
  fi
  cat "$err" >&2
  rm -f "$err"
  return 1
}

# ------------------------------------------------------------------ flag sets

define_common_flags() {
  flag name eva-tpu "name of the queued resource and of its TPU node"
  flag project "" "Google Cloud project" required
  flag zone "" "zone of the TPU, e.g. us-east5-a (v5p) or us-west4-a (v5e)" required
  flag dry_run false "print the gcloud commands instead of running them" bool
}

define_create_flags() {
  flag accelerator_type v5p-64 "TPU type and size, e.g. v5p-64, v5litepod-256, v4-32, v6e-64"
  flag runtime_version auto "TPU software version; auto: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e (v5litepod), v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4 and older"
  flag spot false "spot capacity: cheaper, can be preempted (resume.sh recreates it)" bool
  flag reserved false "use reserved capacity" bool
  flag service_account "" "service account of the TPU VMs (empty: the default compute one); it needs read and write access to the gs:// workdir"
  flag scopes "" "comma-separated OAuth scopes of that service account (empty: gcloud's default)"
  flag wait true "wait until the queued resource is ACTIVE" bool
  flag only_wait false "do not create: only wait for an existing queued resource to be ACTIVE" bool
  flag timeout_s 86400 "give up waiting for ACTIVE after this many seconds (the request stays queued)"
  flag poll_s 30 "seconds between two looks at the queued resource's state"
}

define_worker_flags() {
  flag remote_dir eva_jax "folder on every worker, relative to the home folder, that holds the venv (venv/) and the logs (logs/)"
}

define_setup_flags() {
  flag commit "" "install eva_jax from git at this commit (or tag, or branch); needs --repo_url"
  flag repo_url "" "git URL of eva_jax for --commit, e.g. https://github.com/OWNER/eva_jax"
  flag wheel "" "install eva_jax from this wheel instead: gs://BUCKET/.../eva_jax-*.whl"
  flag jax_version 0.10.2 "JAX version: pip install \"jax[tpu]==VERSION\" (libtpu comes with it)"
  flag extras gcs "eva_jax extras to install (comma-separated; gcs is needed for gs:// workdirs)"
  flag python python3.11 "Python (3.11 or newer) that makes the venv"
  flag install_python true "apt-get install --python (and its -venv) when a worker lacks it" bool
}

define_launch_flags() {
  flag workdir "" "run folder, gs://BUCKET/runs/NAME (a local one only on a single-host TPU); the same workdir again resumes the run" required
  flag gin_file "" "gin file: a shipped name (eva_gemma.gin, losses/ipo.gin), a gs:// path or a path on the workers; none: eva_jax's default" list
  flag gin_binding "" "gin binding, e.g. \"SOLVER = 'gs://BUCKET/gemma-2-9b-it'\"; passed as --gin_bindings" list
  flag_alias gin_bindings gin_binding
  flag env "" "KEY=VALUE set in the job's environment on every worker" list
  flag allow_config_change false "pass --allow_config_change (resume a workdir made with another configuration)" bool
  flag num_workers auto "workers (hosts) of the slice; auto: ask gcloud (networkEndpoints); only used to refuse a local --workdir on several hosts"
}

define_logs_flags() {
  flag worker 0 "worker whose log to show: 0, another index, or all"
  flag lines 100 "lines of the log to show first"
  flag follow true "keep following the log (tail -F; Ctrl-C stops following, not the job)" bool
}

define_stop_flags() {
  flag stop_wait_s 300 "seconds to wait for the job to save and exit after SIGTERM"
}

define_resume_flags() {
  flag watch false "keep watching: every --watch_s seconds look at the slice and the job; recreate, set up and relaunch after each preemption, until the job exits" bool
  flag watch_s 120 "seconds between two looks with --watch"
  flag force false "recreate the slice even when it is ACTIVE" bool
  flag max_restarts 20 "with --watch, give up after this many recoveries"
}

# ------------------------------------------------------------------ steps

# runtime_version: sets RUNTIME_VERSION from --runtime_version / --accelerator_type.
runtime_version() {
  RUNTIME_VERSION=$F_runtime_version
  if [ "$RUNTIME_VERSION" != auto ]; then return 0; fi
  case $F_accelerator_type in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) usage_error "no default runtime version for --accelerator_type=$F_accelerator_type: pass --runtime_version (see https://cloud.google.com/tpu/docs/runtimes)" ;;
  esac
}

do_create() {
  need_int timeout_s "$F_timeout_s"
  need_int poll_s "$F_poll_s"
  runtime_version
  if [ "$F_spot" = true ] && [ "$F_reserved" = true ]; then usage_error "--spot and --reserved exclude each other"; fi
  local args=(compute tpus queued-resources create "$F_name" --node-id="$F_name"
    --project="$F_project" --zone="$F_zone" --accelerator-type="$F_accelerator_type"
    --runtime-version="$RUNTIME_VERSION")
  if [ "$F_spot" = true ]; then args+=(--spot); fi
  if [ "$F_reserved" = true ]; then args+=(--reserved); fi
  if [ -n "$F_service_account" ]; then args+=(--service-account="$F_service_account"); fi
  if [ -n "$F_scopes" ]; then args+=(--scopes="$F_scopes"); fi
  if [ "$F_only_wait" = true ]; then
    wait_active
    return 0
  fi
  gcloud_run "${args[@]}" || die "creating the queued resource $F_name failed (gcloud's message is above). If it exists already, use it as it is or delete it first: tpu_scripts/delete.sh --name=$F_name --project=$F_project --zone=$F_zone"
  if [ "$F_wait" = true ]; then wait_active; fi
}

# wait_active: polls the queued resource until ACTIVE; fails on FAILED, SUSPENDING,
# SUSPENDED or DELETING, and after --timeout_s seconds.
wait_active() {
  local state elapsed failures=0 start=$SECONDS
  qr_describe
  if [ "$F_dry_run" = true ]; then
    printf '# then every %s s until it is ACTIVE (at most %s s):\n' "$F_poll_s" "$F_timeout_s"
    display_cmd gcloud "${QR_DESCRIBE[@]}"
    return 0
  fi
  info "waiting for $F_name to be ACTIVE (every ${F_poll_s}s, at most ${F_timeout_s}s)"
  while :; do
    if state=$(gcloud "${QR_DESCRIBE[@]}"); then
      failures=0
      state=${state//[[:space:]]/}
    else
      failures=$((failures + 1))
      state="unknown (gcloud failed)"
      [ "$failures" -lt 5 ] || die "gcloud failed $failures times in a row reading the state of $F_name; see its message above"
    fi
    case $state in
      ACTIVE)
        info "$F_name is ACTIVE"
        return 0
        ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "the queued resource $F_name is $state: it will not become ACTIVE. Why:" \
          "gcloud compute tpus queued-resources describe $F_name --project=$F_project --zone=$F_zone" \
          "(state.failedData). Then delete it (tpu_scripts/delete.sh) and create it again," \
          "perhaps in another zone, with another size, or without --spot."
        ;;
    esac
    elapsed=$((SECONDS - start))
    if [ "$elapsed" -ge "$F_timeout_s" ]; then
      die "timed out after ${elapsed}s waiting for $F_name to be ACTIVE (last state: ${state:-none});" \
        "the request stays queued: wait again with create.sh --only_wait, look with" \
        "gcloud compute tpus queued-resources describe $F_name --project=$F_project --zone=$F_zone," \
        "or delete it with tpu_scripts/delete.sh."
    fi
    info "$F_name is ${state:-not reported yet}; waiting (${elapsed}s of at most ${F_timeout_s}s)"
    sleep "$F_poll_s"
  done
}

do_setup() {
  local source
  if [ -n "$F_commit" ] && [ -n "$F_wheel" ]; then usage_error "pass --commit or --wheel, not both"; fi
  if [ -n "$F_commit" ]; then
    [ -n "$F_repo_url" ] || usage_error "missing required flag --repo_url (the git URL that --commit=$F_commit is in)"
    source="git+${F_repo_url#git+}@$F_commit"
  elif [ -n "$F_wheel" ]; then
    case $F_wheel in
      gs://*.whl) source=$F_wheel ;;
      *) usage_error "--wheel is a gs://.../eva_jax-*.whl, not '$F_wheel' (copy a local wheel up first: gcloud storage cp dist/eva_jax-*.whl gs://BUCKET/wheels/)" ;;
    esac
  else
    usage_error "missing required flag --commit (with --repo_url) or --wheel: which eva_jax to install"
  fi
  ssh_worker all "$(remote_command setup "$F_remote_dir" "$F_python" "$F_install_python" \
    "$F_jax_version" "$source" "$F_extras")" \
    || die "setting up the workers of $F_name failed (the workers' messages are above)"
}

# num_workers: sets NUM_WORKERS (empty when unknown: a dry run with --num_workers=auto).
num_workers() {
  local out re='^[0-9]+$'
  NUM_WORKERS=""
  if [ "$F_num_workers" != auto ]; then
    need_int num_workers "$F_num_workers" 1
    NUM_WORKERS=$F_num_workers
    return 0
  fi
  local args=(compute tpus tpu-vm describe "$F_name" --project="$F_project" --zone="$F_zone"
    --format='value(networkEndpoints.len())')
  if [ "$F_dry_run" = true ]; then
    printf '# how many workers %s has (a local --workdir needs exactly 1):\n' "$F_name"
    display_cmd gcloud "${args[@]}"
    return 0
  fi
  out=$(gcloud "${args[@]}") || die "could not read how many workers $F_name has (gcloud's message is above); is it created? Or pass --num_workers"
  out=${out//[[:space:]]/}
  [[ $out =~ $re ]] && [ "$out" -ge 1 ] || die "gcloud says $F_name has '$out' workers; pass --num_workers"
  NUM_WORKERS=$out
}

# check_workdir NUM_WORKERS: refuses a local --workdir on several workers (warns when unknown).
check_workdir() {
  case $F_workdir in
    gs://?*) ;;
    *)
      if [ -z "$1" ]; then
        info "warning: --workdir=$F_workdir is not on gs://: that only works when $F_name has a single worker"
      elif [ "$1" -gt 1 ]; then
        usage_error "--workdir=$F_workdir is not a gs:// path, but $F_name has $1 workers" \
          "(hosts), each with its own local disk: every process must read and write the same" \
          "run folder. Pass --workdir=gs://BUCKET/runs/NAME."
      fi
      ;;
  esac
}

do_launch() {
  local e re='^[A-Za-z_][A-Za-z0-9_]*=' eva_args=() envs=()
  for e in ${F_env[@]+"${F_env[@]}"}; do
    [[ $e =~ $re ]] || usage_error "--env=$e is not KEY=VALUE"
    envs+=("$e")
  done
  num_workers
  check_workdir "$NUM_WORKERS"
  for e in ${F_gin_file[@]+"${F_gin_file[@]}"}; do eva_args+=(--gin_file="$e"); done
  for e in ${F_gin_binding[@]+"${F_gin_binding[@]}"}; do eva_args+=(--gin_bindings="$e"); done
  eva_args+=(--workdir="$F_workdir")
  if [ "$F_allow_config_change" = true ]; then eva_args+=(--allow_config_change); fi
  ssh_worker all "$(remote_command launch "$F_remote_dir" ${envs[@]+"${envs[@]}"} -- "${eva_args[@]}")" \
    || die "launching on the workers of $F_name failed (the workers' messages are above)"
  if [ "$F_dry_run" != true ]; then
    info "launched on every worker of $F_name; follow it with tpu_scripts/logs.sh --name=$F_name --project=$F_project --zone=$F_zone"
  fi
}

do_logs() {
  local cmd=(tail -n "$F_lines")
  need_int lines "$F_lines"
  if [ "$F_follow" = true ]; then cmd+=(-F); fi
  cmd+=("$F_remote_dir/logs/eva_jax.log")
  ssh_worker "$F_worker" "$(shq_join "${cmd[@]}")"
}

do_stop() {
  need_int stop_wait_s "$F_stop_wait_s"
  ssh_worker all "$(remote_command stop "$F_remote_dir" "$F_stop_wait_s")" \
    || die "stopping the job on $F_name failed (the workers' messages are above)"
}

do_delete() {
  gcloud_run compute tpus queued-resources delete "$F_name" --project="$F_project" \
    --zone="$F_zone" --force --quiet || die "deleting $F_name failed (gcloud's message is above)"
}

# job_status: sets JOB_STATUS to worker 0's job state (running PID, exited RC [sigterm],
# stopped, dead or absent); returns 1 when it cannot be read.
job_status() {
  local out line
  out=$(ssh_worker 0 "$(remote_command status "$F_remote_dir")" 2> /dev/null) || return 1
  JOB_STATUS=""
  while IFS= read -r line; do
    case $line in "EVA_STATUS "*) JOB_STATUS=${line#EVA_STATUS } ;; esac
  done <<< "$out"
  [ -n "$JOB_STATUS" ]
}

setup_and_launch() {
  do_setup
  do_launch
}

# recover STATE: delete (unless NOT_FOUND), create and wait, set up, launch.
recover() {
  if [ "$1" != NOT_FOUND ]; then do_delete; fi
  do_create
  do_setup
  do_launch
}

do_resume() {
  need_int watch_s "$F_watch_s"
  need_int max_restarts "$F_max_restarts"
  qr_describe
  if [ "$F_dry_run" = true ]; then
    printf '# the state of %s:\n' "$F_name"
    display_cmd gcloud "${QR_DESCRIBE[@]}"
    printf '# when it is FAILED, SUSPENDING or SUSPENDED (a preemption), or ACTIVE with --force:\n'
    do_delete
    printf '# (when it is missing, from here on:)\n'
    do_create
    do_setup
    do_launch
    if [ "$F_watch" = true ]; then
      printf '# then every %s s (--watch), the state as above, and the job on worker 0:\n' "$F_watch_s"
      ssh_worker 0 "$(remote_command status "$F_remote_dir")"
    fi
    return 0
  fi
  qr_state || die "could not read the state of $F_name (gcloud's message is above)"
  info "$F_name is $QR_STATE"
  case $QR_STATE in
    ACTIVE)
      if [ "$F_force" = true ]; then
        recover ACTIVE
      elif [ "$F_watch" != true ]; then
        die "$F_name is ACTIVE: nothing to recover. To run the job again on it:" \
          "tpu_scripts/launch.sh (it resumes from the workdir; stop a running one first with" \
          "tpu_scripts/stop.sh); to watch it: resume.sh --watch; to recreate it anyway: --force."
      fi
      ;;
    NOT_FOUND | FAILED | SUSPENDING | SUSPENDED) recover "$QR_STATE" ;;
    DELETING)
      wait_gone
      recover NOT_FOUND
      ;;
    *)
      info "$F_name is being created; waiting for it, then setting it up and launching"
      wait_active
      do_setup
      do_launch
      ;;
  esac
  if [ "$F_watch" = true ]; then watch_loop; fi
}

wait_gone() {
  info "waiting for $F_name to be deleted"
  while :; do
    if qr_state && [ "$QR_STATE" = NOT_FOUND ]; then return 0; fi
    sleep "$F_poll_s"
  done
}

# try_step FUNCTION ARGS...: runs the step in a subshell that stops at its first failure;
# returns its status instead of ending the script (the watch loop tries again later).
try_step() {
  local rc=0
  set +e
  (
    set -e
    "$@"
  )
  rc=$?
  set -e
  [ "$rc" = 0 ] || info "$1 failed (status $rc); trying again at the next look"
  return 0
}

watch_loop() {
  local restarts=0 sigterm_seen=0
  info "watching $F_name every ${F_watch_s}s (Ctrl-C stops watching, not the job)"
  while :; do
    sleep "$F_watch_s"
    if ! qr_state; then
      info "could not read the state of $F_name; trying again in ${F_watch_s}s"
      continue
    fi
    case $QR_STATE in
      ACTIVE) ;;
      NOT_FOUND | FAILED | SUSPENDING | SUSPENDED | DELETING)
        restarts=$((restarts + 1))
        [ "$restarts" -le "$F_max_restarts" ] || die "$F_name is $QR_STATE again, after $F_max_restarts recoveries (--max_restarts); giving up"
        info "$F_name is $QR_STATE (preempted?): recovery $restarts of at most $F_max_restarts"
        if [ "$QR_STATE" = DELETING ]; then
          wait_gone
          QR_STATE=NOT_FOUND
        fi
        try_step recover "$QR_STATE"
        sigterm_seen=0
        continue
        ;;
      *)
        info "$F_name is $QR_STATE"
        continue
        ;;
    esac
    if ! job_status; then
      info "could not read the job's state on worker 0 of $F_name; trying again in ${F_watch_s}s"
      continue
    fi
    case $JOB_STATUS in
      running*) sigterm_seen=0 ;;
      "exited 0")
        info "eva_jax finished on $F_name (exit status 0); the run is in $F_workdir. Delete the slice when done: tpu_scripts/delete.sh"
        return 0
        ;;
      "exited "*sigterm | dead | absent)
        # SIGTERM while the slice stays ACTIVE (a maintenance event), or a worker that
        # restarted: give a preemption one more look to show, then launch again (it resumes).
        if [ "$JOB_STATUS" = "${JOB_STATUS%sigterm}" ] || [ "$sigterm_seen" = 1 ]; then
          restarts=$((restarts + 1))
          [ "$restarts" -le "$F_max_restarts" ] || die "the job stopped again after $F_max_restarts recoveries (--max_restarts); giving up"
          info "the job on $F_name is $JOB_STATUS while the slice is ACTIVE: launching again ($restarts of at most $F_max_restarts)"
          if [ "$JOB_STATUS" = absent ]; then
            try_step setup_and_launch
          else
            try_step do_launch
          fi
          sigterm_seen=0
        else
          info "the job on $F_name got SIGTERM; looking again in ${F_watch_s}s before relaunching"
          sigterm_seen=1
        fi
        ;;
      stopped)
        info "the job on $F_name was stopped with stop.sh; not relaunching"
        return 0
        ;;
      "exited "*) die "eva_jax exited with status ${JOB_STATUS#exited } on worker 0 of $F_name: see tpu_scripts/logs.sh; not relaunching" ;;
      *) info "unexpected job state on worker 0: $JOB_STATUS" ;;
    esac
  done
}
