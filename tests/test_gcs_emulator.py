"""The GCS emulator of the gs:// tests (eva_jax.testing.gcs): Orbax and tensorstore writes that
the previous emulator (gcp-storage-emulator) refused, gcsfs, subprocesses, clean-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_jax.testing import gcs


def _state(mesh: Mesh, step: int) -> dict:
  """A small pytree sharded over every device of `mesh`, its values a function of `step`."""
  rows = NamedSharding(mesh, P(mesh.axis_names))
  w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) + step
  return {"w": jax.device_put(w, rows),
          "opt": {"mu": jax.device_put(w * 0.5, rows), "count": np.asarray(step, np.int32)}}


def _assert_state(restored: dict, step: int) -> None:
  mesh = Mesh(np.array(jax.devices()), ("data",))
  want = jax.tree_util.tree_map(np.asarray, _state(mesh, step))
  got = jax.tree_util.tree_map(np.asarray, restored)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_ocdbt_revalidation_sequence(gcs_bucket):
  """Write, read back, write again in one OCDBT store: the manifest's second write is
  conditional on the generation the read revalidated. gcp-storage-emulator failed this every
  time ("Malformed StorageGeneration"); it is the core of Orbax's random failures there."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  for i in range(3):
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"{gcs_bucket}/ocdbt{i}/"}).result()
    kv.write("a", b"1").result()
    time.sleep(0.05)  # the manifest's cached copy goes stale and is revalidated
    assert kv.read("a").result().value == b"1"
    kv.write("b", b"2").result()
    assert kv.read("b").result().value == b"2"
    assert epath.Path(f"{gcs_bucket}/ocdbt{i}/manifest.ocdbt").exists()


def test_checkpoint_manager_loop_and_resume_on_another_mesh(gcs_bucket):
  directory = f"{gcs_bucket}/run/checkpoints"
  mesh = Mesh(np.array(jax.devices()), ("data",))  # 8-way
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in range(10):
      manager.save(step, args=ocp.args.StandardSave(_state(mesh, step)))
    manager.wait_until_finished()
    assert manager.all_steps() == [8, 9] and manager.latest_step() == 9
    _assert_state(manager.restore(9, args=ocp.args.StandardRestore()), 9)
  # The deleted steps are gone from the bucket, not only from the manager's list.
  assert sorted(p.name for p in epath.Path(directory).iterdir()) == ["8", "9"]

  # A new manager (a resumed job) finds the same steps and restores onto another mesh.
  other = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  with ocp.CheckpointManager(directory, options=options) as manager:
    assert manager.all_steps() == [8, 9] and manager.latest_step() == 9
    target = {"w": jax.ShapeDtypeStruct((8, 6), np.float32, sharding=NamedSharding(
                  other, P("data", None))),
              "opt": {"mu": jax.ShapeDtypeStruct((8, 6), np.float32,
                                                 sharding=NamedSharding(other, P("model"))),
                      "count": np.zeros((), np.int32)}}
    restored = manager.restore(8, args=ocp.args.StandardRestore(target))
    assert restored["w"].sharding == target["w"].sharding
    assert restored["opt"]["mu"].sharding == target["opt"]["mu"].sharding
    _assert_state(restored, 8)
    # ...and keeps saving where the old one stopped.
    manager.save(10, args=ocp.args.StandardSave(restored))
    manager.wait_until_finished()
    assert manager.all_steps() == [9, 10]
    _assert_state(manager.restore(10, args=ocp.args.StandardRestore()), 8)


def test_gcsfs_and_subprocesses_see_the_bucket(gcs_bucket):
  (epath.Path(gcs_bucket) / "parent.txt").write_text("from the parent")
  # The child imports gcsfs and tensorstore fresh: the inherited env vars alone must suffice.
  child = textwrap.dedent(f"""
      from etils import epath
      import tensorstore as ts
      bucket = epath.Path({gcs_bucket!r})
      assert (bucket / "parent.txt").read_text() == "from the parent"
      (bucket / "child.txt").write_text("from the child")
      kv = ts.KvStore.open({gcs_bucket + "/"!r}).result()
      assert kv.read("parent.txt").result().value == b"from the parent"
      kv.write("child.bin", b"tensorstore").result()
  """)
  result = subprocess.run([sys.executable, "-c", child], capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (epath.Path(gcs_bucket) / "child.txt").read_text() == "from the child"
  assert (epath.Path(gcs_bucket) / "child.bin").read_bytes() == b"tensorstore"


def test_environment_is_restored_and_server_stopped(monkeypatch):
  monkeypatch.setenv("FSSPEC_GCS_TOKEN", "user-value")
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  before = {k: os.environ.get(k) for k in gcs.ENV_VARS}
  with gcs.gcs_emulator("eva-named-bucket") as bucket:
    assert bucket == "gs://eva-named-bucket"
    url = os.environ["STORAGE_EMULATOR_HOST"]
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == url and url.startswith("http://127.0.0.1:")
    assert os.environ["FSSPEC_GCS_TOKEN"] == "anon"
    assert epath.Path(bucket).exists() and not list(epath.Path(bucket).iterdir())
  assert {k: os.environ.get(k) for k in gcs.ENV_VARS} == before
  with pytest.raises(urllib.error.URLError):
    urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2)
  with pytest.raises(ValueError, match=r"'Bad_Name' is not a valid GCS bucket name"):
    with gcs.gcs_emulator("Bad_Name"):
      pass
