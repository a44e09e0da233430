"""Test configuration for tests/ and the doctests in clipjax/: 8 CPU devices for
mesh tests, strict dtype promotion, and float32 matrix products at full precision
(the default on CPUs; on NVIDIA GPUs the default is TF32, about 1e-3 relative,
too coarse for the suite's comparisons at rtol 1e-5)."""

import jax

# Must run before any JAX computation initialises the backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")
