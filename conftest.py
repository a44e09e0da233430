"""Test configuration for tests/ and the doctests in clipjax/: 8 CPU devices for
mesh tests, strict dtype promotion."""

import jax

# Must run before any JAX computation initialises the backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
