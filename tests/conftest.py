"""Test-wide setup: 8 CPU devices (for sharded tests), before anything imports jax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# gcsfs reads this when it is first imported (which any test touching etils.epath may do), so
# the gs:// tests' fixture would set it too late: the emulator does not speak the
# hierarchical-namespace API that gcsfs otherwise probes.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
