"""``clipjax.privacy`` against dp_accounting itself, numpy formulas and statistics.

Accounting is compared with dp_accounting called directly; noise is checked for
its moments over many draws, for determinism given the key, for dtypes, and
under jit and vmap; ``dp_sgd`` is compared with its formula written out by
hand; adaptive clipping with the rule of Andrew et al. re-derived in numpy, and
for convergence to the target quantile of a fixed distribution.
"""

import itertools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipjax
from clipjax import privacy

dp_accounting = pytest.importorskip("dp_accounting")

_ACCOUNTANTS = {
  "rdp": lambda: dp_accounting.rdp.RdpAccountant(),
  "pld": lambda: dp_accounting.pld.PLDAccountant(),
}


def _direct_epsilon(accountant, z, q, steps, delta):
  """epsilon from dp_accounting, without clipjax."""
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
  )
  return _ACCOUNTANTS[accountant]().compose(event).get_epsilon(delta)


# --- Accounting ---------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize(
  ("z", "q", "steps", "delta"),
  [(1.0, 0.05, 100, 1e-5), (2.0, 0.01, 300, 1e-6), (0.8, 1.0, 1, 1e-3)],
)
def test_epsilon_equals_dp_accounting(accountant, z, q, steps, delta):
  got = privacy.epsilon(z, q, steps, delta, accountant=accountant)
  assert isinstance(got, float)
  assert got == pytest.approx(_direct_epsilon(accountant, z, q, steps, delta))


def test_pld_is_tighter_than_rdp():
  rdp = privacy.epsilon(1.0, 0.05, 100, 1e-5)
  pld = privacy.epsilon(1.0, 0.05, 100, 1e-5, accountant="pld")
  assert 0 < pld < rdp


def test_epsilon_is_monotone_in_each_argument():
  base = {"noise_multiplier": 1.0, "sample_rate": 0.02, "steps": 200, "delta": 1e-5}
  eps = lambda **kw: privacy.epsilon(**{**base, **kw})
  zs = [eps(noise_multiplier=z) for z in (0.6, 0.8, 1.0, 1.5, 3.0)]
  assert all(a > b for a, b in itertools.pairwise(zs))
  qs = [eps(sample_rate=q) for q in (0.005, 0.01, 0.02, 0.1, 1.0)]
  assert all(a < b for a, b in itertools.pairwise(qs))
  ts = [eps(steps=t) for t in (1, 10, 100, 1000)]
  assert all(a < b for a, b in itertools.pairwise(ts))
  ds = [eps(delta=d) for d in (1e-8, 1e-6, 1e-4, 1e-2)]
  assert all(a > b for a, b in itertools.pairwise(ds))


def test_epsilon_edge_cases():
  assert privacy.epsilon(0.0, 0.1, 10, 1e-5) == math.inf
  assert privacy.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
  assert privacy.epsilon(math.inf, 0.1, 10, 1e-5) == 0.0
  assert privacy.epsilon(1.0, 0.1, np.int64(10), 1e-5) == privacy.epsilon(
    1.0, 0.1, 10, 1e-5
  )


@pytest.mark.parametrize(
  ("accountant", "target", "q", "steps"),
  [
    ("rdp", 3.0, 0.05, 500),
    ("rdp", 0.5, 0.01, 1000),
    ("rdp", 50.0, 1.0, 1),
    ("pld", 2.0, 0.1, 50),
  ],
)
def test_noise_multiplier_for_is_the_smallest_within_tol(accountant, target, q, steps):
  tol = 1e-4
  z = privacy.noise_multiplier_for(
    target, q, steps, 1e-5, accountant=accountant, tol=tol
  )
  reached = privacy.epsilon(z, q, steps, 1e-5, accountant=accountant)
  assert reached <= target
  assert reached == pytest.approx(target, rel=1e-2)
  # Less noise by more than the tolerance spends more than the target.
  assert privacy.epsilon(z - 2 * tol, q, steps, 1e-5, accountant=accountant) > target


def test_noise_multiplier_for_is_monotone_and_has_edge_cases():
  zs = [privacy.noise_multiplier_for(e, 0.02, 500, 1e-5) for e in (0.5, 1, 2, 8)]
  assert all(a > b for a, b in itertools.pairwise(zs))
  assert privacy.noise_multiplier_for(1.0, 0.02, 0, 1e-5) == 0.0
  assert privacy.noise_multiplier_for(math.inf, 0.02, 10, 1e-5) == 0.0


def test_accounting_without_dp_accounting_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "dp_accounting", None)
  with pytest.raises(ImportError, match=r"clipjax\[privacy\]"):
    privacy.epsilon(1.0, 0.1, 10, 1e-5)
  with pytest.raises(ImportError, match="noise_multiplier_for needs dp-accounting"):
    privacy.noise_multiplier_for(1.0, 0.1, 10, 1e-5)


def test_importing_privacy_imports_neither_dp_accounting_nor_flax():
  code = (
    "import sys, clipjax.privacy, clipjax\n"
    "assert 'dp_accounting' not in sys.modules, 'dp_accounting'\n"
    "assert 'flax' not in sys.modules, 'flax'\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, done.stderr[-2000:]


# --- gaussian_noise -----------------------------------------------------------------


def _noise(stddev, key, tree, steps=1, jit=False):
  """The updates of ``steps`` calls of gaussian_noise on ``tree``."""
  tx = privacy.gaussian_noise(stddev, key)
  update = jax.jit(tx.update) if jit else tx.update
  state, out = tx.init(tree), []
  for _ in range(steps):
    u, state = update(tree, state)
    out.append(u)
  return out, state


def test_noise_has_mean_zero_and_the_stddev():
  n, stddev = 200_000, 0.7
  (u,), state = _noise(stddev, jax.random.key(1), {"w": jnp.zeros((n,))})
  x = np.asarray(u["w"], np.float64)
  assert abs(x.mean()) < 5 * stddev / math.sqrt(n)
  # The sample stddev's own stddev is about stddev / sqrt(2 n).
  assert abs(x.std() - stddev) < 5 * stddev / math.sqrt(2 * n)
  # Gaussian: the fraction within one stddev is 0.6827.
  assert abs(np.mean(np.abs(x) < stddev) - 0.6827) < 0.005
  assert int(state.count) == 1


def test_noise_is_independent_across_leaves_and_steps():
  tree = {"a": jnp.zeros((50_000,)), "b": jnp.zeros((50_000,))}
  (u1, u2), _ = _noise(1.0, jax.random.key(2), tree, steps=2)
  pairs = [(u1["a"], u1["b"]), (u1["a"], u2["a"]), (u1["b"], u2["b"])]
  for x, y in pairs:
    assert abs(np.corrcoef(np.asarray(x), np.asarray(y))[0, 1]) < 0.02


def test_noise_is_added_to_the_values():
  g = {"w": jnp.arange(4.0)}
  (u,), _ = _noise(0.0, jax.random.key(0), g)
  np.testing.assert_array_equal(u["w"], g["w"])
  (noised,), _ = _noise(1.0, jax.random.key(0), g)
  (alone,), _ = _noise(1.0, jax.random.key(0), {"w": jnp.zeros(4)})
  np.testing.assert_allclose(noised["w"], g["w"] + alone["w"], rtol=1e-6)


def test_same_key_same_noise_other_key_other_noise():
  g = {"w": jnp.zeros((8,)), "b": jnp.zeros((2, 3))}
  first, s1 = _noise(1.0, jax.random.key(3), g, steps=3)
  again, s2 = _noise(1.0, jax.random.key(3), g, steps=3, jit=True)
  other, _ = _noise(1.0, jax.random.key(4), g, steps=3)
  for a, b, c in zip(first, again, other, strict=True):
    np.testing.assert_array_equal(a["w"], b["w"])
    np.testing.assert_array_equal(a["b"], b["b"])
    assert not np.allclose(a["w"], c["w"])
  # Each step draws anew.
  assert not np.allclose(first[0]["w"], first[1]["w"])
  np.testing.assert_array_equal(
    jax.random.key_data(s1.key), jax.random.key_data(s2.key)
  )


def test_raw_and_typed_keys_give_the_same_noise():
  g = {"w": jnp.zeros((16,))}
  typed, s_typed = _noise(1.0, jax.random.key(5), g, steps=2)
  raw, s_raw = _noise(1.0, jax.random.PRNGKey(5), g, steps=2)
  for a, b in zip(typed, raw, strict=True):
    np.testing.assert_array_equal(a["w"], b["w"])
  assert s_raw.key.dtype == jnp.uint32
  assert jax.dtypes.issubdtype(s_typed.key.dtype, jax.dtypes.prng_key)


def test_resuming_from_a_saved_state_continues_the_same_noise():
  g = {"w": jnp.zeros((5,))}
  tx = privacy.gaussian_noise(1.0, jax.random.PRNGKey(6))
  state = tx.init(g)
  straight = []
  for _ in range(4):
    u, state = tx.update(g, state)
    straight.append(u["w"])
  state = tx.init(g)
  for _ in range(2):
    _, state = tx.update(g, state)
  saved = jax.tree.map(np.asarray, state)  # as a checkpoint would hold it
  fresh = privacy.gaussian_noise(1.0, jax.random.PRNGKey(99))  # key unused now
  state = privacy.GaussianNoiseState(*map(jnp.asarray, saved))
  for expected in straight[2:]:
    u, state = fresh.update(g, state)
    np.testing.assert_array_equal(u["w"], expected)
  assert int(state.count) == 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_noise_keeps_the_leaf_dtype(dtype):
  g = {"w": jnp.zeros((20_000,), dtype), "x": jnp.ones((3,), dtype)}
  (u,), _ = _noise(2.0, jax.random.key(7), g)
  assert u["w"].dtype == dtype and u["x"].dtype == dtype
  assert abs(float(jnp.std(u["w"].astype(jnp.float32))) - 2.0) < 0.1


def test_noise_keeps_float64_under_x64():
  with jax.enable_x64(True):
    g = {"a": jnp.zeros((20_000,), jnp.float64), "b": jnp.zeros((3,), jnp.float32)}
    tx = privacy.gaussian_noise(1.5, jax.random.key(8))
    u, _ = jax.jit(tx.update)(g, tx.init(g))
    assert u["a"].dtype == jnp.float64 and u["b"].dtype == jnp.float32
    assert abs(float(jnp.std(u["a"])) - 1.5) < 0.05
    # Drawn in float64: not float32 values cast up.
    a = np.asarray(u["a"])
    assert np.any(a != a.astype(np.float32).astype(np.float64))


def test_noise_passes_none_and_empty_trees():
  for tree in ({}, [], None, {"a": None, "b": [None]}):
    (u,), state = _noise(1.0, jax.random.key(9), tree)
    assert u == tree
    assert int(state.count) == 1
  g = {"a": None, "b": jnp.zeros(3)}
  (u,), _ = _noise(1.0, jax.random.key(9), g, jit=True)
  assert u["a"] is None and u["b"].shape == (3,)


def test_noise_rejects_integer_leaves():
  tx = privacy.gaussian_noise(1.0, jax.random.key(0))
  g = {"n": jnp.zeros(3, jnp.int32)}
  with pytest.raises(TypeError, match=r"gaussian_noise: leaf \['n'\] has dtype int32"):
    tx.update(g, tx.init(g))


def test_noise_with_a_traced_stddev_under_jit():
  g = {"w": jnp.zeros((10_000,))}
  key = jax.random.key(10)

  @jax.jit
  def run(stddev):
    tx = privacy.gaussian_noise(stddev, key)
    return tx.update(g, tx.init(g))[0]["w"]

  for stddev in (0.0, 0.5, 3.0):
    (expected,), _ = _noise(stddev, key, g)
    np.testing.assert_allclose(run(stddev), expected["w"], rtol=1e-6)


def test_noise_vmaps_over_a_stack_of_states_and_stddevs():
  g = {"w": jnp.zeros((4_000,)), "b": jnp.zeros((2,))}
  keys = jax.random.split(jax.random.key(11), 3)
  stddevs = jnp.array([0.0, 1.0, 4.0])

  def step(state, stddev):
    tx = privacy.gaussian_noise(stddev, state.key)
    return tx.update(g, state)

  init = jax.vmap(lambda k: privacy.gaussian_noise(1.0, k).init(g))(keys)
  updates, states = jax.jit(jax.vmap(step))(init, stddevs)
  assert updates["w"].shape == (3, 4_000)
  np.testing.assert_array_equal(states.count, [1, 1, 1])
  np.testing.assert_array_equal(updates["w"][0], 0.0)
  np.testing.assert_allclose(jnp.std(updates["w"], axis=1), stddevs, rtol=0.05)
  for i in range(3):
    (single,), _ = _noise(float(stddevs[i]), keys[i], g)
    np.testing.assert_allclose(updates["w"][i], single["w"], rtol=1e-6)


# --- dp_sgd -------------------------------------------------------------------------


def test_dp_sgd_is_noise_then_mean_then_sgd():
  lr, clip, z, batch = 0.5, 2.0, 1.3, 8
  key = jax.random.key(12)
  grads = [{"w": jnp.array([1.0, -2.0, 3.0])}, {"w": jnp.array([0.5, 0.5, -1.0])}]
  tx = privacy.dp_sgd(lr, clip, z, key, batch_size=batch, momentum=0.9)
  state = tx.init(grads[0])
  noise, _ = _noise(z * clip, key, {"w": jnp.zeros(3)}, steps=2)  # same draws
  trace = np.zeros(3)
  for g, n in zip(grads, noise, strict=True):
    u, state = tx.update(g, state)
    # By hand: noised sum / batch, heavy-ball momentum, step -lr.
    noised = (np.asarray(g["w"], np.float64) + np.asarray(n["w"])) / batch
    trace = noised + 0.9 * trace
    np.testing.assert_allclose(u["w"], -lr * trace, rtol=1e-5)


def test_dp_sgd_noise_has_stddev_z_times_clip_over_batch():
  g = {"w": jnp.zeros((50_000,))}
  tx = privacy.dp_sgd(1.0, 0.5, 2.0, jax.random.key(13), batch_size=4)
  u, _ = jax.jit(tx.update)(g, tx.init(g))
  assert float(jnp.std(u["w"])) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)


def test_dp_sgd_takes_a_schedule_and_traced_hyperparameters():
  g = {"w": jnp.ones(3)}
  key = jax.random.key(14)
  tx = privacy.dp_sgd(optax.constant_schedule(0.1), 1.0, 0.0, key, batch_size=2)
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["w"], -0.05)
  injected = optax.inject_hyperparams(
    privacy.dp_sgd, static_args=("key", "batch_size", "momentum", "nesterov")
  )(learning_rate=1.0, l2_clip=1.0, noise_multiplier=1.0, key=key, batch_size=1)
  state = injected.init(g)
  state.hyperparams["l2_clip"] = jnp.asarray(0.0)  # no noise at a zero bound
  u, _ = jax.jit(injected.update)(g, state)
  np.testing.assert_allclose(u["w"], -1.0)


def test_dp_sgd_on_per_example_clipped_grad_equals_numpy():
  if not hasattr(clipjax, "per_example_clipped_grad"):
    pytest.skip("clipjax.per_example_clipped_grad is not available")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  y = rng.normal(size=(6,)).astype(np.float32)
  w = jnp.asarray([0.3, -0.2, 0.1])
  clip, z, lr, key = 0.5, 1.1, 0.2, jax.random.key(15)

  def loss_fn(w, x, y):
    return (x @ w - y) ** 2

  grads, norms = clipjax.per_example_clipped_grad(loss_fn, l2_clip=clip)(w, x, y)
  tx = privacy.dp_sgd(lr, clip, z, key, batch_size=6)
  u, _ = tx.update(grads, tx.init(w), w)

  per_example = 2 * ((x @ np.asarray(w)) - y)[:, None] * x  # d/dw (x w - y)^2
  own = np.linalg.norm(per_example, axis=1)
  summed = (per_example * np.minimum(1, clip / own)[:, None]).sum(0)
  (noise,), _ = _noise(z * clip, key, jnp.zeros_like(w))
  np.testing.assert_allclose(norms, own, rtol=1e-5)
  np.testing.assert_allclose(u, -lr * (summed + np.asarray(noise)) / 6, rtol=1e-4)


# --- Adaptive clipping --------------------------------------------------------------


def _numpy_adaptive(clip, norms, target, lr, geometric, denominator=None):
  """One noiseless step of Andrew et al.'s rule, in float64 numpy."""
  norms = np.asarray(norms, np.float64)
  denominator = len(norms) if denominator is None else denominator
  unclipped = np.isfinite(norms) & (norms <= clip)
  b = np.clip((unclipped - 0.5).sum() / denominator + 0.5, 0, 1)
  if geometric:
    return clip * np.exp(-lr * (b - target))
  return max(0.0, clip - lr * (b - target))


@pytest.mark.parametrize("geometric", [True, False])
def test_adaptive_update_follows_the_rule_without_noise(geometric):
  rng = np.random.default_rng(1)
  state = privacy.adaptive_clip_init(1.5, jax.random.key(16))
  clip = 1.5
  update = jax.jit(
    lambda s, n: privacy.adaptive_clip_update(
      s,
      n,
      target_quantile=0.7,
      learning_rate=0.3,
      count_stddev=0.0,
      geometric=geometric,
    )
  )
  for _ in range(20):
    norms = rng.lognormal(0.0, 1.0, size=16).astype(np.float32)
    state = update(state, norms)
    clip = _numpy_adaptive(clip, norms, 0.7, 0.3, geometric)
    assert float(state.clip) == pytest.approx(clip, rel=1e-5)
    assert state.clip.dtype == jnp.float32


def test_adaptive_update_divides_by_the_expected_batch_size():
  state = privacy.adaptive_clip_init(1.0, jax.random.key(17))
  norms = jnp.array([0.1, 0.2, 5.0, 0.3])  # 3 of 4 unclipped
  new = privacy.adaptive_clip_update(state, norms, count_stddev=0.0, batch_size=10.0)
  # (3 - 1/2 * 4) / 10 + 1/2 = 0.6
  assert float(new.clip) == pytest.approx(math.exp(-0.2 * (0.6 - 0.5)), rel=1e-6)
  empty = privacy.adaptive_clip_update(
    state, jnp.zeros((0,)), count_stddev=0.0, batch_size=10.0
  )
  assert float(empty.clip) == pytest.approx(1.0)


def test_adaptive_update_counts_nonfinite_norms_as_clipped():
  state = privacy.adaptive_clip_init(1.0, jax.random.key(18))
  norms = jnp.array([0.5, jnp.nan, jnp.inf, 0.5])
  new = privacy.adaptive_clip_update(
    state, norms, target_quantile=0.0, learning_rate=1.0, count_stddev=0.0
  )
  assert float(new.clip) == pytest.approx(math.exp(-0.5), rel=1e-6)
  # Even under an infinite bound, an infinite or NaN norm counts as clipped.
  inf_state = state._replace(clip=jnp.asarray(jnp.inf))
  new = privacy.adaptive_clip_update(
    inf_state, norms, target_quantile=0.0, learning_rate=1.0, count_stddev=0.0
  )
  assert float(new.clip) == math.inf  # b = 0.5, not 1
  new = privacy.adaptive_clip_update(
    inf_state, norms, target_quantile=0.5, learning_rate=1.0, count_stddev=0.0
  )
  assert float(new.clip) == math.inf  # inf * exp(0), not NaN


def test_adaptive_noise_enters_the_count_with_its_stddev():
  # 8 of 16 unclipped: b = 0.5 + noise / 16; log(C'/C) = -lr (b - target).
  norms = jnp.concatenate([jnp.full(8, 0.5), jnp.full(8, 2.0)])
  lr, stddev, target = 0.2, 1.6, 0.5
  keys = jax.random.split(jax.random.key(19), 4000)

  def one(key):
    state = privacy.adaptive_clip_init(1.0, key)
    new = privacy.adaptive_clip_update(
      state, norms, target_quantile=target, learning_rate=lr, count_stddev=stddev
    )
    return new.clip

  logs = np.log(np.asarray(jax.jit(jax.vmap(one))(keys), np.float64))
  b = -logs / lr + target  # the noised fraction
  assert abs(b.mean() - 0.5) < 5 * (stddev / 16) / math.sqrt(len(keys))
  assert b.std() == pytest.approx(stddev / 16, rel=0.05)


def test_adaptive_fraction_is_clipped_to_the_unit_interval():
  state = privacy.adaptive_clip_init(1.0, jax.random.key(20))
  norms = jnp.ones(10)
  for i in range(20):
    state = privacy.adaptive_clip_update(
      state._replace(clip=jnp.asarray(1.0)),
      norms,
      target_quantile=0.3,
      learning_rate=1.0,
      count_stddev=1e6,
    )
    # b in {0, 1}: log C' in {0.3, -0.7}.
    log_clip = math.log(float(state.clip))
    assert min(abs(log_clip - 0.3), abs(log_clip + 0.7)) < 1e-5, i


def test_adaptive_linear_update_stays_non_negative():
  state = privacy.adaptive_clip_init(0.05, jax.random.key(21))
  new = privacy.adaptive_clip_update(
    state, jnp.zeros(4), target_quantile=0.0, count_stddev=0.0, geometric=False
  )
  assert float(new.clip) == 0.0


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_adaptive_clip_converges_to_the_quantile(target):
  # Norms ~ lognormal(0, 1): the median is 1, the 0.9-quantile exp(1.2816).
  batch = 256
  quantile = 1.0 if target == 0.5 else math.exp(1.2815516)

  def step(state, key):
    norms = jnp.exp(jax.random.normal(key, (batch,)))
    state = privacy.adaptive_clip_update(
      state, norms, target_quantile=target, count_stddev=batch / 20
    )
    return state, state.clip

  init = privacy.adaptive_clip_init(0.01, jax.random.key(22))
  keys = jax.random.split(jax.random.key(23), 600)
  _, clips = jax.jit(lambda s, k: jax.lax.scan(step, s, k))(init, keys)
  late = np.asarray(clips[300:], np.float64)
  assert np.exp(np.mean(np.log(late))) == pytest.approx(quantile, rel=0.1)
  assert np.all(late > 0.5 * quantile) and np.all(late < 2 * quantile)


def test_adaptive_update_is_deterministic_and_vmaps_over_states():
  norms = jnp.linspace(0.1, 3.0, 32)
  keys = jax.random.split(jax.random.key(24), 3)
  clips = jnp.array([0.5, 1.0, 2.0])
  states = jax.vmap(privacy.adaptive_clip_init)(clips, keys)
  upd = lambda s: privacy.adaptive_clip_update(s, norms, count_stddev=1.6)
  batched = jax.jit(jax.vmap(upd))(states)
  for i in range(3):
    single = upd(privacy.adaptive_clip_init(float(clips[i]), keys[i]))
    assert float(batched.clip[i]) == pytest.approx(float(single.clip), rel=1e-6)
    again = upd(privacy.adaptive_clip_init(float(clips[i]), keys[i]))
    assert float(again.clip) == float(single.clip)
  assert batched.key.shape == (3,)


@pytest.mark.parametrize(
  ("z", "sigma_b"), [(1.0, 2.5), (0.5, 10.0), (2.0, 1.01), (1.0, math.inf)]
)
def test_adjusted_noise_multiplier_inverts_theorem_1(z, sigma_b):
  z_delta = privacy.adjusted_noise_multiplier(z, sigma_b)
  assert z_delta >= z
  # Theorem 1: z^-2 = z_delta^-2 + (2 sigma_b)^-2.
  assert z**-2 == pytest.approx(z_delta**-2 + (2 * sigma_b) ** -2, rel=1e-12)


def test_adjusted_noise_multiplier_edge_cases():
  assert privacy.adjusted_noise_multiplier(0.0, 0.0) == 0.0
  assert privacy.adjusted_noise_multiplier(1.0, 2.5) == pytest.approx(
    1 / math.sqrt(1 - 1 / 25)
  )
  with pytest.raises(
    ValueError,
    match=r"adjusted_noise_multiplier\(noise_multiplier=1.0, count_stddev=0.5\)",
  ):
    privacy.adjusted_noise_multiplier(1.0, 0.5)
  with pytest.raises(ValueError, match="spends the whole privacy budget"):
    privacy.adjusted_noise_multiplier(2.0, 0.3)


# --- Bad arguments ------------------------------------------------------------------

_KEY = jax.random.key(0)
_BAD = [
  (lambda: privacy.gaussian_noise(-1.0, _KEY), r"gaussian_noise\(stddev=-1.0\)"),
  (lambda: privacy.gaussian_noise(math.inf, _KEY), r"gaussian_noise\(stddev=inf\)"),
  (lambda: privacy.gaussian_noise(math.nan, _KEY), r"gaussian_noise\(stddev=nan\)"),
  (lambda: privacy.gaussian_noise(1.0, 0), r"gaussian_noise\(key=0\) must be a PRNG"),
  (
    lambda: privacy.gaussian_noise(1.0, jnp.zeros(2)),
    r"gaussian_noise\(key=.*\) must be a PRNG",
  ),
  (lambda: privacy.dp_sgd(0.1, 0.0, 1.0, _KEY, batch_size=8), r"dp_sgd\(l2_clip=0.0\)"),
  (
    lambda: privacy.dp_sgd(-0.1, 1.0, 1.0, _KEY, batch_size=8),
    r"dp_sgd\(learning_rate",
  ),
  (
    lambda: privacy.dp_sgd(0.1, 1.0, -1.0, _KEY, batch_size=8),
    r"dp_sgd\(noise_multiplier=-1.0\)",
  ),
  (
    lambda: privacy.dp_sgd(0.1, 1.0, 1.0, _KEY, batch_size=0),
    r"dp_sgd\(batch_size=0\)",
  ),
  (
    lambda: privacy.dp_sgd(0.1, 1.0, 1.0, _KEY, batch_size=8, momentum=-0.5),
    r"dp_sgd\(momentum=-0.5\)",
  ),
  (lambda: privacy.dp_sgd(0.1, 1.0, 1.0, 3, batch_size=8), r"dp_sgd\(key=3\)"),
  (lambda: privacy.epsilon(-1.0, 0.1, 10, 1e-5), r"epsilon\(noise_multiplier=-1.0\)"),
  (
    lambda: privacy.epsilon(1.0, 0.0, 10, 1e-5),
    r"epsilon\(sample_rate=0.0\) must be in",
  ),
  (lambda: privacy.epsilon(1.0, 1.5, 10, 1e-5), r"epsilon\(sample_rate=1.5\)"),
  (lambda: privacy.epsilon(1.0, 0.1, -1, 1e-5), r"epsilon\(steps=-1\) must be an int"),
  (lambda: privacy.epsilon(1.0, 0.1, 2.5, 1e-5), r"epsilon\(steps=2.5\)"),
  (lambda: privacy.epsilon(1.0, 0.1, True, 1e-5), r"epsilon\(steps=True\)"),
  (lambda: privacy.epsilon(1.0, 0.1, 10, 0.0), r"epsilon\(delta=0.0\) must be in \(0"),
  (lambda: privacy.epsilon(1.0, 0.1, 10, 1.0), r"epsilon\(delta=1.0\)"),
  (lambda: privacy.epsilon(1.0, 0.1, 10, "x"), r"epsilon\(delta='x'\) must be a num"),
  (
    lambda: privacy.epsilon(1.0, 0.1, 10, 1e-5, accountant="gdp"),
    r"epsilon\(accountant='gdp'\) must be one of",
  ),
  (
    lambda: privacy.noise_multiplier_for(0.0, 0.1, 10, 1e-5),
    r"noise_multiplier_for\(epsilon=0.0\)",
  ),
  (
    lambda: privacy.noise_multiplier_for(1.0, 0.1, 10, 1e-5, tol=0.0),
    r"noise_multiplier_for\(tol=0.0\)",
  ),
  (
    lambda: privacy.noise_multiplier_for(1.0, 2.0, 10, 1e-5),
    r"noise_multiplier_for\(sample_rate=2.0\)",
  ),
  (
    lambda: privacy.adaptive_clip_init(0.0, _KEY),
    r"adaptive_clip_init\(initial_clip=0.0\)",
  ),
  (lambda: privacy.adaptive_clip_init(1.0, None), r"adaptive_clip_init\(key=None\)"),
  (
    lambda: privacy.adaptive_clip_update(
      privacy.adaptive_clip_init(1.0, _KEY), jnp.ones(3), count_stddev=-1.0
    ),
    r"adaptive_clip_update\(count_stddev=-1.0\)",
  ),
  (
    lambda: privacy.adaptive_clip_update(
      privacy.adaptive_clip_init(1.0, _KEY),
      jnp.ones(3),
      target_quantile=1.5,
      count_stddev=1.0,
    ),
    r"adaptive_clip_update\(target_quantile=1.5\) must be in \[0, 1\]",
  ),
  (
    lambda: privacy.adaptive_clip_update(
      privacy.adaptive_clip_init(1.0, _KEY),
      jnp.ones(3),
      learning_rate=-0.1,
      count_stddev=1.0,
    ),
    r"adaptive_clip_update\(learning_rate=-0.1\)",
  ),
  (
    lambda: privacy.adaptive_clip_update(
      privacy.adaptive_clip_init(1.0, _KEY), jnp.ones((2, 3)), count_stddev=1.0
    ),
    r"adaptive_clip_update: norms must have shape \(B,\), got \(2, 3\)",
  ),
  (
    lambda: privacy.adaptive_clip_update(
      privacy.adaptive_clip_init(1.0, _KEY), jnp.ones(0), count_stddev=1.0
    ),
    r"adaptive_clip_update: norms is empty; give the expected batch_size",
  ),
  (
    lambda: privacy.adjusted_noise_multiplier(-1.0, 1.0),
    r"adjusted_noise_multiplier\(noise_multiplier=-1.0\)",
  ),
  (
    lambda: privacy.adjusted_noise_multiplier(1.0, -1.0),
    r"adjusted_noise_multiplier\(count_stddev=-1.0\)",
  ),
]


@pytest.mark.parametrize(("make", "match"), _BAD)
def test_bad_arguments_raise_naming_the_call(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_public_names():
  assert set(privacy.__all__) == {
    "AdaptiveClipState",
    "GaussianNoiseState",
    "adaptive_clip_init",
    "adaptive_clip_update",
    "adjusted_noise_multiplier",
    "dp_sgd",
    "epsilon",
    "gaussian_noise",
    "noise_multiplier_for",
  }
  for name in privacy.__all__:
    assert getattr(privacy, name).__doc__
