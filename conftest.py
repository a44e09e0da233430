"""Test configuration for tests/ and the doctests in clipjax/: 8 CPU devices for
mesh tests, strict dtype promotion, and float32 matrix products at full precision
(the default on CPUs; on NVIDIA GPUs the default is TF32, about 1e-3 relative,
too coarse for the suite's comparisons at rtol 1e-5)."""

import jax

# Must run before any JAX computation initialises the backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

# Scripts the tests run as subprocesses, not modules to import: importing one
# would run its module-level set-up in the test process.
collect_ignore = ["tests/_resume_worker.py"]


def pytest_collection_finish(session):
  """Fails the run at once if an import during collection changed the device count."""
  del session
  count = jax.device_count()
  if count != 8:
    raise RuntimeError(
      f"the suite needs 8 CPU devices, found {count}: a module imported during"
      " collection set jax_num_cpu_devices"
    )
