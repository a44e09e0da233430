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


# Modules whose tests share a costly module-scoped fixture (an example or a
# worker run in subprocesses, a documentation build): one pytest-xdist worker
# runs each of them whole, so that the fixture runs once, not once per worker.
# (xdist's own --dist loadgroup does not group under pytest 9.2: it renames
# items through an attribute pytest no longer reads.)
SHARED_FIXTURE_MODULES = frozenset(
  f"tests/{name}.py"
  for name in ("test_docs", "test_dp_digits", "test_low_communication", "test_resume")
)


def pytest_xdist_make_scheduler(config, log):
  """Every test its own unit of work, as ``--dist load``, but the modules above."""
  if config.getvalue("dist") != "load":
    return None  # an explicit --dist (the comparison command's loadfile) as asked
  from xdist.scheduler import LoadScopeScheduling

  # In collection order, as --dist load: xdist's reordering would start all of
  # these modules' subprocess runs together, contending for the two cores.
  config.option.loadscopereorder = False

  class Scheduler(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::", 1)[0]
      return module if module in SHARED_FIXTURE_MODULES else nodeid

  return Scheduler(config, log)
