"""The command line: configuration parsing, the operative config, clear errors."""

import os
import subprocess
import sys

import pytest

from eva_jax import main as eva_main


def test_default_run_writes_operative_config_and_says_the_loop_is_missing(tmp_path, capsys):
  rc = eva_main.main(["--workdir", str(tmp_path)])
  assert rc == eva_main.LOOP_MISSING_EXIT
  text = (tmp_path / "config.gin").read_text()
  assert "get_config.name = 'tiny'" in text
  err = capsys.readouterr().err
  assert "not implemented yet" in err


def test_bindings_override_the_gin_file(tmp_path, capsys):
  eva_main.main(["--workdir", str(tmp_path), "--gin_bindings", "get_config.name = 'tiny_gemma1'"])
  assert "get_config.name = 'tiny_gemma1'" in (tmp_path / "config.gin").read_text()
  assert "3 layers" in capsys.readouterr().out


def test_missing_gin_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="--gin_file 'nope.gin' does not exist"):
    eva_main.main(["--gin_file", "nope.gin", "--workdir", str(tmp_path)])


def test_module_entry_point_runs(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "eva_jax.main", "--workdir", str(tmp_path)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == eva_main.LOOP_MISSING_EXIT, proc.stderr
  assert "eva_jax: model" in proc.stdout
