"""Adaptive clippers and spike guards against their papers' rules, re-derived here.

Each rule is re-implemented in a few lines of float64 numpy from the paper (and
the reference code where the paper is silent), run on a short sequence with an
injected spike, and compared step by step with clipjax. Then the properties a
training loop relies on: non-finite steps leave the history alone, state of
fixed size, vmap over hyperparameters, resume from a checkpoint, jit, chains.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipjax

# Unit directions for a two-leaf tree: a gradient of global norm n is n * _DIR.
_DIR = {"a": np.asarray([0.6]), "b": np.asarray([0.48, 0.64])}


def _tree_of_norm(n):
  """A two-leaf float32 tree whose global L2 norm is ``n``."""
  return {k: jnp.asarray(n * v, jnp.float32) for k, v in _DIR.items()}


def _scaled(tree, scale):
  """``tree * scale`` computed in float64, as the expected update."""
  return jax.tree.map(lambda x: np.asarray(x, np.float64) * scale, tree)


def _run(tx, grads, params=None, *, jit=True):
  """All updates and states of ``tx`` over the gradient sequence ``grads``."""
  state = tx.init(grads[0] if params is None else params)
  update = jax.jit(tx.update) if jit else tx.update
  updates, states = [], []
  for g in grads:
    u, state = update(g, state, params)
    updates.append(u)
    states.append(state)
  return updates, states


def _history(state):
  """Everything a clipper carries between steps except its last statistics."""
  return state._replace(stats=None)


@pytest.fixture
def standard_promotion():
  """optax's adam mixes int32 counts and float32 moments internally."""
  with jax.numpy_dtype_promotion("standard"):
    yield


# --- AutoClip ------------------------------------------------------------------

# Norms with spikes at steps 5 and 10 (0-based).
NORMS = [1.0, 2.0, 3.0, 1.5, 2.5, 40.0, 2.0, 1.0, 3.5, 0.5, 25.0, 2.2]


def autoclip_reference(norms, percentile, window):
  """Bounds: the percentile of the last ``window`` norms, the current one included."""
  return [
    float(np.percentile(norms[max(0, t + 1 - window) : t + 1], percentile))
    for t in range(len(norms))
  ]


@pytest.mark.parametrize(
  "percentile,window",
  [(10.0, 1000), (50.0, 4), (90.0, 5), (0.0, 3), (100.0, 6), (37.5, 1)],
)
def test_autoclip_clips_to_the_percentile_of_recent_norms(percentile, window):
  tx = clipjax.autoclip(percentile, window=window)
  grads = [_tree_of_norm(n) for n in NORMS]
  updates, states = _run(tx, grads)
  bounds = autoclip_reference(NORMS, percentile, window)
  for g, u, s, n, bound in zip(grads, updates, states, NORMS, bounds, strict=True):
    chex.assert_trees_all_close(u, _scaled(g, min(1.0, bound / n)), rtol=1e-5)
    np.testing.assert_allclose(s.stats.bound, bound, rtol=1e-5)
    np.testing.assert_allclose(s.stats.norm, n, rtol=1e-6)
    assert bool(s.stats.clipped_fraction) == (bound < n * (1 - 1e-6))
  # The paper's default percentile tames the spike to an ordinary norm.
  if percentile == 10.0:
    assert float(optax.tree.norm(updates[5])) < 2.0


def test_autoclip_state_size_does_not_grow_with_steps():
  window = 64
  rng = np.random.default_rng(0)
  norms = np.exp(rng.normal(size=3000)).astype(np.float32)
  tx = clipjax.autoclip(25.0, window=window)

  @jax.jit
  def run(norms):
    def body(state, n):
      u, state = tx.update(n[None], state)
      return state, u

    return jax.lax.scan(body, tx.init(jnp.zeros(1)), norms)[0]

  short, long = run(jnp.asarray(norms[:10])), run(jnp.asarray(norms))
  shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert shapes(short) == shapes(long) == shapes(tx.init(jnp.zeros(1)))
  assert long.history.shape == (window,)
  assert int(long.seen) == 3000
  # The bound is the percentile of the last `window` norms only.
  expected = np.percentile(norms[-window:].astype(np.float64), 25.0)
  np.testing.assert_allclose(long.stats.bound, expected, rtol=1e-5)
  assert not np.isclose(np.percentile(norms.astype(np.float64), 25.0), expected)
  np.testing.assert_allclose(
    short.stats.bound, np.percentile(norms[:10].astype(np.float64), 25.0), rtol=1e-5
  )


@settings(max_examples=25, deadline=None)
@given(
  norms=st.lists(st.floats(1e-2, 1e2), min_size=12, max_size=12),
  percentile=st.floats(0.0, 100.0),
  window=st.sampled_from([1, 3, 5, 12]),
)
def test_autoclip_bound_is_numpy_percentile_for_random_sequences(
  norms, percentile, window
):
  norms, percentile = np.float32(norms), np.float32(percentile)
  bounds = _autoclip_bounds(window)(jnp.asarray(percentile), jnp.asarray(norms))
  expected = autoclip_reference(norms.astype(np.float64), float(percentile), window)
  np.testing.assert_allclose(bounds, expected, rtol=2e-5)


_AUTOCLIP_BOUNDS = {}


def _autoclip_bounds(window):
  """One compiled scan per window; the percentile is traced, not baked in."""
  if window not in _AUTOCLIP_BOUNDS:

    @jax.jit
    def run(percentile, norms):
      tx = clipjax.autoclip(percentile, window=window)

      def body(state, n):
        _, state = tx.update(n[None], state)
        return state, state.stats.bound

      return jax.lax.scan(body, tx.init(jnp.zeros(1)), norms)[1]

    _AUTOCLIP_BOUNDS[window] = run
  return _AUTOCLIP_BOUNDS[window]


# --- ZClip -----------------------------------------------------------------------

# Four warm-up norms, then a steady run with spikes at steps 6 and 9.
ZNORMS = [1.0, 1.2, 0.8, 1.0, 1.1, 0.9, 50.0, 1.0, 1.05, 30.0, 0.95, 1.3, 1.02]


def zclip_reference(norms, alpha, z_thresh, warmup, mode, max_norm=None, eps=1e-6):
  """ZClip as in the paper and its reference code.

  Warm-up: the first ``warmup`` norms give the mean and the population variance
  (only ``max_norm`` clips). Then a norm with z-score above ``z_thresh`` is
  clipped to ``mu + z_thresh**2 * sigma / z`` (or ``mu``), and the EMA is fed
  the adaptively clipped norm (``max_norm`` is applied on top, not fed back).
  Returns the bound in force and the (mean, var) after each step.
  """
  ceiling = math.inf if max_norm is None else max_norm
  buffer, mean, var, out = [], None, None, []
  for n in norms:
    if mean is None:
      buffer.append(n)
      # The state holds the exact running statistics (Welford's) meanwhile.
      out.append((ceiling, float(np.mean(buffer)), float(np.var(buffer))))
      if len(buffer) == warmup:
        mean, var = float(np.mean(buffer)), float(np.var(buffer))
      continue
    std = math.sqrt(var)
    z = (n - mean) / (std + eps)
    clip_val = None
    if z > z_thresh:
      clip_val = mean + z_thresh**2 * std / z if mode == "adaptive_scaling" else mean
    # No spike: the bound reported is the norm above which it would be one.
    in_force = mean + z_thresh * (std + eps) if clip_val is None else clip_val
    bound = min(in_force, ceiling)
    fed = n if clip_val is None else clip_val
    mean = alpha * mean + (1 - alpha) * fed
    var = alpha * var + (1 - alpha) * (fed - mean) ** 2
    out.append((bound, mean, var))
  return out


@pytest.mark.parametrize(
  "mode,max_norm,z_thresh,alpha",
  [
    ("adaptive_scaling", None, 2.5, 0.97),
    ("mean", None, 2.5, 0.97),
    ("adaptive_scaling", 1.15, 2.5, 0.9),
    ("adaptive_scaling", None, 1.0, 0.5),
  ],
)
def test_zclip_follows_the_z_score_rule(mode, max_norm, z_thresh, alpha):
  tx = clipjax.zclip(alpha, z_thresh, 4, mode=mode, max_norm=max_norm)
  grads = [_tree_of_norm(n) for n in ZNORMS]
  updates, states = _run(tx, grads)
  expected = zclip_reference(ZNORMS, alpha, z_thresh, 4, mode, max_norm)
  for t, (g, u, s, n) in enumerate(zip(grads, updates, states, ZNORMS, strict=True)):
    bound, mean, var = expected[t]
    chex.assert_trees_all_close(u, _scaled(g, min(1.0, bound / n)), rtol=1e-5)
    np.testing.assert_allclose(s.stats.bound, bound, rtol=1e-5)
    np.testing.assert_allclose(s.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(s.var, var, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(s.stats.extra["std"], math.sqrt(var), rtol=1e-5)
    assert int(s.seen) == t + 1
  # The spikes were detected and brought down close to the running mean.
  for t in (6, 9):
    assert float(states[t].stats.extra["z"]) > z_thresh
    assert float(optax.tree.norm(updates[t])) < 1.5


def test_zclip_z_statistic_and_warmup():
  tx = clipjax.zclip(warmup_steps=4)
  _, states = _run(tx, [_tree_of_norm(n) for n in ZNORMS[:7]])
  for s in states[:4]:
    assert float(s.stats.extra["z"]) == 0.0
    assert float(s.stats.scale) == 1.0
  mean, var = np.mean(ZNORMS[:4]), np.var(ZNORMS[:4])
  np.testing.assert_allclose(states[3].mean, mean, rtol=1e-6)
  np.testing.assert_allclose(states[3].var, var, rtol=1e-5)
  _, mean4, var4 = zclip_reference(ZNORMS, 0.97, 2.5, 4, "adaptive_scaling")[5]
  z = (ZNORMS[6] - mean4) / (math.sqrt(var4) + 1e-6)
  np.testing.assert_allclose(states[6].stats.extra["z"], z, rtol=1e-4)


# --- AdaGC -----------------------------------------------------------------------

# Per-step norms of three tensors: "a" spikes at step 4, "b" at step 5, "c" has
# no gradient until step 3.
ADAGC_NORMS = {
  "a": [3.0, 2.5, 4.0, 3.5, 30.0, 3.0, 3.2, 2.9],
  "b": [1.0, 1.2, 0.9, 1.1, 1.0, 8.0, 1.0, 1.3],
  "c": [0.0, 0.0, 0.0, 2.0, 2.2, 9.0, 2.1, 1.9],
}
_ADAGC_DIRS = {
  "a": np.asarray([[0.6, 0.8], [0.0, 0.0]]),
  "b": np.asarray([1.0]),
  "c": np.asarray([0.0, -0.28, 0.96]),
}


def _adagc_grads():
  steps = len(ADAGC_NORMS["a"])
  return [
    {k: jnp.asarray(ADAGC_NORMS[k][t] * d, jnp.float32) for k, d in _ADAGC_DIRS.items()}
    for t in range(steps)
  ]


def adagc_reference(norms, relative, beta, warmup_steps, warmup_max_norm):
  """Per-step scale of each tensor, and gamma after each step.

  Steps t = 1, 2, ...: the first step and every t < warmup_steps clip the global
  norm to ``warmup_max_norm`` and set gamma_i = min(gamma_i, ||clipped g_i||);
  later steps clip tensor i to relative * gamma_i, then gamma_i <- beta * gamma_i
  + (1 - beta) * ||clipped g_i||. gamma_i = 0 means no history: such a tensor is
  not clipped and its first nonzero clipped norm becomes gamma_i.
  """
  keys = list(norms)
  gamma = dict.fromkeys(keys, 0.0)
  scales, gammas = [], []
  for t in range(1, len(norms[keys[0]]) + 1):
    n = {k: norms[k][t - 1] for k in keys}
    if t == 1 or t < warmup_steps:
      total = math.sqrt(sum(v**2 for v in n.values()))
      s = min(1.0, warmup_max_norm / total)
      scale = dict.fromkeys(keys, s)
      for k in keys:
        clipped = n[k] * s
        if clipped > 0:
          gamma[k] = clipped if gamma[k] == 0 else min(gamma[k], clipped)
    else:
      scale = {}
      for k in keys:
        known = gamma[k] > 0
        scale[k] = min(1.0, relative * gamma[k] / n[k]) if known and n[k] else 1.0
        clipped = n[k] * scale[k]
        gamma[k] = beta * gamma[k] + (1 - beta) * clipped if known else clipped
    scales.append(scale)
    gammas.append(dict(gamma))
  return scales, gammas


@pytest.mark.parametrize(
  "relative,beta,warmup_steps,warmup_max_norm",
  [(1.05, 0.98, 3, 3.5), (1.5, 0.5, 1, 10.0), (1.0, 0.9, 5, 2.0)],
)
def test_adagc_clips_each_tensor_to_its_ema(
  relative, beta, warmup_steps, warmup_max_norm
):
  tx = clipjax.adagc(relative, beta, warmup_steps, warmup_max_norm)
  grads = _adagc_grads()
  updates, states = _run(tx, grads)
  scales, gammas = adagc_reference(
    ADAGC_NORMS, relative, beta, warmup_steps, warmup_max_norm
  )
  for g, u, s, scale, gamma in zip(grads, updates, states, scales, gammas, strict=True):
    for k in _ADAGC_DIRS:
      np.testing.assert_allclose(u[k], np.asarray(g[k]) * scale[k], rtol=1e-5)
      np.testing.assert_allclose(s.gamma[k], gamma[k], rtol=1e-5)
      np.testing.assert_allclose(s.stats.scale[k], scale[k], rtol=1e-5)
  # After the warm-up, a spike in one tensor is clipped without touching the others.
  if warmup_steps <= 4:
    assert float(states[4].stats.scale["a"]) < 0.2
    assert float(states[4].stats.scale["b"]) == 1.0


def test_adagc_first_step_is_warm_even_with_warmup_of_one():
  tx = clipjax.adagc(relative=1.0, warmup_steps=1, warmup_max_norm=1.0)
  g = {"a": jnp.asarray([3.0, 4.0])}
  u, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(u["a"], [0.6, 0.8], rtol=1e-6)  # global clip to 1
  np.testing.assert_allclose(state.gamma["a"], 1.0, rtol=1e-6)
  u, state = tx.update(g, state)  # now relative: 1.0 * gamma
  np.testing.assert_allclose(u["a"], [0.6, 0.8], rtol=1e-6)


# --- quantile clipping -------------------------------------------------------------

QUANTILE_NORMS = [
  [0.5, 2.0, 1.0, 4.0],
  [0.4, 1.5, 0.9, 3.0],
  [0.6, 20.0, 1.1, 2.5],
  [0.3, 1.0, 0.8, 2.0],
  [0.2, 0.5, 0.7, 1.8],
  [0.5, 0.6, 0.4, 0.9],
  [0.1, 0.2, 0.3, 0.4],
]


def quantile_reference(norms, target, lr, initial):
  """Bound in force at each step: C <- C * exp(-lr * (unclipped - target))."""
  bound, bounds = initial, []
  for step in norms:
    bounds.append(bound)
    unclipped = np.mean([n <= bound for n in step])
    bound = bound * math.exp(-lr * (unclipped - target))
  return bounds, bound


@pytest.mark.parametrize("target,lr", [(0.5, 0.2), (0.9, 1.0), (0.0, 0.5)])
def test_quantile_clip_follows_the_geometric_update(target, lr):
  tx = clipjax.quantile_clip(target, learning_rate=lr, initial_max_norm=1.0)
  grads = [
    {f"w{i}": jnp.asarray([0.0, -n], jnp.float32) for i, n in enumerate(step)}
    for step in QUANTILE_NORMS
  ]
  updates, states = _run(tx, grads)
  bounds, final = quantile_reference(QUANTILE_NORMS, target, lr, 1.0)
  for step, u, s, bound in zip(QUANTILE_NORMS, updates, states, bounds, strict=True):
    for i, n in enumerate(step):
      np.testing.assert_allclose(u[f"w{i}"], [0.0, -min(n, bound)], rtol=1e-5)
    np.testing.assert_allclose(s.stats.bound, bound, rtol=1e-5)
    np.testing.assert_allclose(
      s.stats.extra["unclipped_fraction"], np.mean([n <= bound for n in step])
    )
  np.testing.assert_allclose(states[-1].max_norm, final, rtol=1e-5)


# --- Clippy ----------------------------------------------------------------------


def clippy_reference(updates, params, relative, absolute):
  """Each tensor times min(1, min_j (relative * |w_j| + absolute) / |u_j|)."""
  out = {}
  for k, u in updates.items():
    u, w = np.asarray(u, np.float64), np.asarray(params[k], np.float64)
    allowance = relative * np.abs(w) + absolute
    with np.errstate(divide="ignore"):
      ratios = np.where(u != 0, allowance / np.abs(u), np.inf)
    out[k] = u * min(1.0, float(ratios.min()))
  return out


@pytest.mark.parametrize("relative,absolute", [(0.1, 1e-7), (0.5, 0.01), (0.0, 0.02)])
def test_clippy_bounds_every_coordinate_by_its_allowance(relative, absolute):
  rng = np.random.default_rng(3)
  params = {
    "w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
    "b": jnp.asarray([0.0, 1.0, -2.0], jnp.float32),
    "quiet": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
  }
  updates = {
    "w": jnp.asarray(0.05 * rng.normal(size=(6, 4)), jnp.float32).at[2, 1].set(3.0),
    "b": jnp.asarray([0.01, -0.3, 0.1], jnp.float32),
    "quiet": jnp.zeros(5, jnp.float32),
  }
  tx = clipjax.clippy(relative, absolute)
  u, stats = jax.jit(tx.update)(updates, tx.init(params), params)
  expected = clippy_reference(updates, params, relative, absolute)
  chex.assert_trees_all_close(u, expected, rtol=1e-5, atol=1e-12)
  np.testing.assert_array_equal(u["quiet"], 0.0)
  assert float(stats.scale["w"]) < 1.0
  # No coordinate moves more than its allowance.
  for k in u:
    allowance = relative * np.abs(np.asarray(params[k])) + absolute
    assert np.all(np.abs(np.asarray(u[k])) <= allowance * (1 + 1e-5))

  chained = optax.chain(optax.sgd(1.0), clipjax.clippy(relative, absolute))
  u2, _ = chained.update(updates, chained.init(params), params)
  neg = jax.tree.map(lambda x: -x, updates)
  chex.assert_trees_all_close(
    u2, clippy_reference(neg, params, relative, absolute), rtol=1e-5, atol=1e-12
  )


# --- SPAM ------------------------------------------------------------------------


def spam_reference(grads, threshold, beta2, warmup_steps):
  """SPAM's clipping: from step warmup_steps on, g**2 > threshold * v is set to
  sign(g) * sqrt(threshold * v) where v > 0; v <- beta2 v + (1 - beta2) g**2
  with the clipped g (v not bias-corrected)."""
  v = np.zeros_like(grads[0], np.float64)
  out = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    spike = (t >= warmup_steps) & (v > 0) & (g**2 > threshold * v)
    g = np.where(spike, np.sign(g) * np.sqrt(threshold * v), g)
    v = beta2 * v + (1 - beta2) * g**2
    out.append((g, v))
  return out


@pytest.mark.parametrize(
  "threshold,beta2,warmup_steps", [(4.0, 0.9, 3), (50.0, 0.5, 1), (2.0, 0.99, 6)]
)
def test_spam_clip_clips_coordinates_against_their_second_moment(
  threshold, beta2, warmup_steps
):
  rng = np.random.default_rng(7)
  grads = rng.normal(size=(10, 6))
  grads[:, 5] = 0.0
  grads[4, 5] = 3.0  # first gradient of a fresh coordinate: v == 0, kept
  grads[2, 0] = 40.0  # spike before or after the warm-up
  grads[6, 1] = -25.0  # negative spike
  grads = [jnp.asarray(g, jnp.float32) for g in grads]
  tx = clipjax.spam_clip(threshold, beta2, warmup_steps=warmup_steps)
  updates, states = _run(tx, grads)
  expected = spam_reference(grads, threshold, beta2, warmup_steps)
  for u, s, (g_ref, v_ref) in zip(updates, states, expected, strict=True):
    np.testing.assert_allclose(u, g_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s.nu, v_ref, rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(updates[4][5], 3.0)
  if threshold == 4.0:
    assert abs(float(updates[6][1])) < 25.0  # the negative spike was clipped
    assert float(updates[6][1]) < 0.0


# --- skip_and_clip ---------------------------------------------------------------


def test_skip_and_clip_skips_zeroes_and_clips():
  norms = [0.5, 3.0, 20.0, math.nan, 1.5, math.inf, 0.8]
  grads = [_tree_of_norm(n) for n in norms]
  momentum = 0.9
  tx = clipjax.skip_and_clip(1.0, 10.0, inner=optax.sgd(0.1, momentum=momentum))
  updates, states = _run(tx, grads)
  trace, skipped = None, 0
  for g, u, s, n in zip(grads, updates, states, norms, strict=True):
    skip = not math.isfinite(n) or n > 10.0
    skipped += skip
    if skip:
      chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, g))
    else:
      clipped = _scaled(g, min(1.0, 1.0 / n))
      trace = (
        clipped
        if trace is None
        else jax.tree.map(lambda c, m: c + momentum * m, clipped, trace)
      )
      chex.assert_trees_all_close(u, jax.tree.map(lambda m: -0.1 * m, trace), rtol=1e-5)
    assert int(s.stats.extra["skipped"]) == skip
    assert int(s.stats.extra["skipped_steps"]) == skipped
  assert skipped == 3

  bare = clipjax.skip_and_clip(1.0, 10.0)
  updates, _ = _run(bare, grads)
  chex.assert_trees_all_close(updates[1], _scaled(grads[1], 1 / 3.0), rtol=1e-6)
  chex.assert_trees_all_equal(updates[0], grads[0])
  for t in (2, 3, 5):
    assert float(optax.tree.norm(updates[t])) == 0.0


@pytest.mark.usefixtures("standard_promotion")
def test_skip_and_clip_leaves_adam_state_bit_identical_on_a_skipped_step():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  good = [jax.tree.map(lambda p, s=s: jnp.full_like(p, s), params) for s in (0.1, 0.2)]
  nan = jax.tree.map(lambda p: p.at[0].set(jnp.nan), good[0])
  huge = jax.tree.map(lambda p: 1e4 * p, good[1])
  tx = clipjax.skip_and_clip(1.0, 100.0, inner=optax.adam(1e-3))
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(good[0], state, params)
  for bad in (nan, huge):
    u, after = update(bad, state, params)
    chex.assert_trees_all_equal(after.inner_state, state.inner_state)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    state = after
  assert int(state.stats.extra["skipped_steps"]) == 2
  assert int(state.inner_state[0].count) == 1
  # The next update is the one adam gives as if the bad steps never happened.
  u, _ = update(good[1], state, params)
  adam = optax.adam(1e-3)
  adam_state = adam.init(params)
  for g in good:
    expected, adam_state = jax.jit(adam.update)(g, adam_state, params)
  chex.assert_trees_all_equal(u, expected)


# --- non-finite steps --------------------------------------------------------------

STATEFUL = {
  "autoclip": lambda nf: clipjax.autoclip(50.0, window=3, nonfinite=nf),
  "zclip": lambda nf: clipjax.zclip(0.9, warmup_steps=2, nonfinite=nf),
  "adagc": lambda nf: clipjax.adagc(warmup_steps=2, warmup_max_norm=5.0, nonfinite=nf),
  "quantile_clip": lambda nf: clipjax.quantile_clip(0.5, 0.3, nonfinite=nf),
  "spam_clip": lambda nf: clipjax.spam_clip(4.0, 0.9, warmup_steps=1, nonfinite=nf),
}


@functools.cache
def _jitted(name, nonfinite):
  """One compiled update per configuration, shared by the tests below."""
  tx = STATEFUL[name](nonfinite)
  return tx, jax.jit(tx.update)


def _sequence(seed, steps=5):
  rng = np.random.default_rng(seed)
  return [
    {
      "a": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
    }
    for _ in range(steps)
  ]


def _poison(g, value):
  return {**g, "b": g["b"].at[1, 0].set(value)}


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("at", [0, 3])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_nonfinite_step_leaves_history_unchanged_and_is_counted(name, at, bad_value):
  grads = _sequence(0)
  bad = _poison(grads[at], bad_value)
  tx, update = _jitted(name, "zero")
  state = tx.init(grads[0])
  for g in grads[:at]:
    _, state = update(g, state)
  u, after = update(bad, state)
  chex.assert_trees_all_equal(_history(after), _history(state))
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, bad))
  assert int(after.stats.extra["nonfinite_steps"]) == 1

  # The rest of the run is the run without the bad step.
  clean = tx.init(grads[0])
  for g in grads[:at]:
    _, clean = update(g, clean)
  state = after
  for g in grads[at:]:
    u, state = update(g, state)
    u_clean, clean = update(g, clean)
    chex.assert_trees_all_equal(u, u_clean)
    chex.assert_trees_all_equal(_history(state), _history(clean))
  assert int(state.stats.extra["nonfinite_steps"]) == 1


def _overflowing_tree():
  """A tree whose squares overflow float32 in one leaf (1e30**2), with a leaf
  of ordinary values, a scalar leaf and an empty one."""
  rng = np.random.default_rng(3)
  return {
    "big": jnp.asarray(rng.normal(size=(3, 5)) * 1e30, jnp.float32),
    "small": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
    "scalar": jnp.asarray(-2.5, jnp.float32),
    "empty": jnp.zeros((0, 4), jnp.float32),
  }


def _norm64(x):
  return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


@pytest.mark.parametrize("jit", [True, False])
def test_norms_are_right_when_the_sums_of_squares_overflow(jit):
  # The finite norms of a finite tree, also when a sum of squares overflows
  # float32: the overflow path of the per-leaf norms and of spam_clip's two
  # global norms, against float64 numpy.
  g = _overflowing_tree()
  total = math.sqrt(sum(_norm64(x) ** 2 for x in g.values()))
  run = lambda tx: _run(tx, [g], jit=jit)

  _, (state,) = run(clipjax.adagc(warmup_steps=3, warmup_max_norm=1e38))
  for k, x in g.items():
    np.testing.assert_allclose(state.stats.norm[k], _norm64(x), rtol=1e-6)
  assert float(state.stats.norm["small"]) == pytest.approx(_norm64(g["small"]), 1e-6)
  assert int(state.stats.extra["nonfinite_steps"]) == 0

  (u,), (state,) = run(clipjax.quantile_clip(initial_max_norm=1e38))
  np.testing.assert_allclose(state.stats.norm, total, rtol=1e-6)
  chex.assert_trees_all_close(u, g)  # every norm is below 1e38: nothing clipped
  assert int(state.stats.extra["nonfinite_steps"]) == 0

  (u,), (state,) = run(clipjax.spam_clip(warmup_steps=1))
  np.testing.assert_allclose(state.stats.norm, total, rtol=1e-6)
  np.testing.assert_allclose(state.stats.scale, 1.0, rtol=1e-6)  # v == 0: kept
  chex.assert_trees_all_equal(u, g)
  assert int(state.stats.extra["nonfinite_steps"]) == 0


def _propagate_step(name, bad_value):
  """Three good steps, then a step with one bad coordinate, with "propagate"."""
  grads = _sequence(1)
  tx, update = _jitted(name, "propagate")
  state = tx.init(grads[0])
  for g in grads[:3]:
    _, state = update(g, state)
  bad = _poison(grads[3], bad_value)
  u, after = update(bad, state)
  return bad, u, state, after


@pytest.mark.parametrize("name", list(STATEFUL))
def test_nonfinite_propagate_passes_the_nan_on(name):
  bad, u, before, after = _propagate_step(name, math.nan)
  chex.assert_trees_all_equal(_history(after), _history(before))
  assert int(after.stats.extra["nonfinite_steps"]) == 1
  for k in bad:
    np.testing.assert_array_equal(np.isnan(u[k]), np.isnan(bad[k]))
  # A NaN update trips optax.apply_if_finite downstream.
  assert not bool(jnp.isfinite(optax.tree.norm(u)))


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_nonfinite_propagate_passes_the_update_through_unchanged(name, bad_value):
  # The module doc: '"propagate" passes it through unchanged for a later guard'.
  bad, u, _, _ = _propagate_step(name, bad_value)
  chex.assert_trees_all_equal(u, bad)


def test_skip_and_clip_nonfinite_step_leaves_inner_state_unchanged():
  grads = _sequence(2)
  tx = clipjax.skip_and_clip(1.0, math.inf, inner=optax.sgd(0.1, momentum=0.9))
  _, states = _run(tx, grads[:3])
  u, after = jax.jit(tx.update)(_poison(grads[3], math.nan), states[-1])
  chex.assert_trees_all_equal(after.inner_state, states[-1].inner_state)
  assert float(optax.tree.norm(u)) == 0.0
  assert int(after.stats.extra["skipped_steps"]) == 1


@pytest.mark.parametrize("name", list(STATEFUL))
def test_bfloat16_leaves_keep_their_dtype(name):
  grads = _sequence(3)
  half = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in grads]
  tx, update = _jitted(name, "zero")
  as32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  state, state32 = tx.init(half[0]), tx.init(grads[0])
  for g in half:
    u, state = update(g, state)
    u32, state32 = update(as32(g), state32)  # the same rounded inputs in float32
  chex.assert_trees_all_equal_dtypes(u, half[0])
  chex.assert_trees_all_close(as32(u), u32, rtol=1e-2, atol=1e-2)


def test_autoclip_works_with_x64_enabled():
  # Mixed float32/float64 trees need x64; strict promotion is on in the tests.
  with jax.enable_x64(True):
    g = {"a": jnp.asarray([3.0], jnp.float64), "b": jnp.asarray([4.0], jnp.float32)}
    tx = clipjax.autoclip(50.0, window=4)
    state = tx.init(g)
    for scale in (1.0, 2.0, 10.0):
      u, state = tx.update(jax.tree.map(lambda x, s=scale: s * x, g), state)
    assert u["a"].dtype == jnp.float64 and u["b"].dtype == jnp.float32
    # The median of the norms 5, 10 and 50.
    np.testing.assert_allclose(state.stats.bound, 10.0, rtol=1e-6)


# --- vmap over hyperparameters ----------------------------------------------------

ENSEMBLES = {
  "zclip/z_thresh": (
    lambda h: clipjax.zclip(0.9, h, warmup_steps=3),
    [1.0, 2.5, 100.0],
  ),
  "zclip/alpha": (lambda h: clipjax.zclip(h, 1.5, warmup_steps=3), [0.0, 0.5, 0.97]),
  "autoclip/percentile": (
    lambda h: clipjax.autoclip(h, window=4),
    [0.0, 10.0, 90.0],
  ),
  "skip_and_clip/max_norm": (
    lambda h: clipjax.skip_and_clip(h, 12.0, inner=optax.sgd(0.1, momentum=0.9)),
    [0.5, 2.0, math.inf],
  ),
  "adagc/relative": (
    lambda h: clipjax.adagc(h, 0.9, warmup_steps=3, warmup_max_norm=2.0),
    [0.5, 1.05, 2.0],
  ),
  "quantile_clip/target_quantile": (
    lambda h: clipjax.quantile_clip(h, 0.5),
    [0.0, 0.5, 1.0],
  ),
  "spam_clip/threshold": (
    lambda h: clipjax.spam_clip(h, 0.8, warmup_steps=2),
    [1.0, 4.0, 5000.0],
  ),
}


def _spiky_sequence(seed, steps=10):
  """Gradients with a spike and then a NaN near the end of ``steps`` steps."""
  grads = _sequence(seed, steps)
  grads[-4] = jax.tree.map(lambda x: 30.0 * x, grads[-4])
  grads[-2] = _poison(grads[-2], math.nan)
  return grads


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.mark.parametrize("name", list(ENSEMBLES))
def test_vmap_over_hyperparameters_equals_separate_runs(name):
  make, values = ENSEMBLES[name]
  grads = _stack(_spiky_sequence(4))

  def run(h, grads):
    tx = make(h)

    def body(state, g):
      u, state = tx.update(g, state)
      return state, u

    first = jax.tree.map(lambda x: x[0], grads)
    return jax.lax.scan(body, tx.init(first), grads)

  hs = jnp.asarray(values, jnp.float32)
  states, updates = jax.jit(jax.vmap(run, in_axes=(0, None)))(hs, grads)
  for i, h in enumerate(values):
    state_i, updates_i = run(h, grads)
    pick = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    chex.assert_trees_all_close(pick(updates), updates_i, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(pick(states), state_i, rtol=1e-6, atol=1e-7)


# --- resume from a checkpoint -----------------------------------------------------

RESUMABLE = {
  "zclip+adam": lambda: optax.chain(clipjax.zclip(warmup_steps=3), optax.adam(1e-3)),
  "autoclip+adam": lambda: optax.chain(
    clipjax.autoclip(10.0, window=4), optax.adam(1e-3)
  ),
  "adagc+adam": lambda: optax.chain(clipjax.adagc(warmup_steps=3), optax.adam(1e-3)),
  "skip_and_clip(adam)": lambda: clipjax.skip_and_clip(
    1.0, 50.0, inner=optax.chain(clipjax.spam_clip(warmup_steps=2), optax.adam(1e-3))
  ),
}


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_from_checkpoint_gives_the_same_next_updates(name, tmp_path):
  tx = RESUMABLE[name]()
  rng = np.random.default_rng(5)
  params = {
    "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    "b": jnp.zeros(3, jnp.float32),
  }
  grads = [
    jax.tree.map(
      lambda p, s=s: jnp.asarray(s * rng.normal(size=p.shape), p.dtype), params
    )
    for s in (1.0, 1.2, 0.9, 1.1, 40.0, 1.0, 0.8, 100.0, 1.05)
  ]

  @jax.jit
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  def run(params, state, grads):
    for g in grads:
      params, state = step(params, state, g)
    return params, state

  mid_params, mid_state = run(params, tx.init(params), grads[:5])
  expected = run(mid_params, mid_state, grads[5:])

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": mid_params, "opt_state": mid_state})
  checkpointer.wait_until_finished()
  target = {"params": params, "opt_state": tx.init(params)}
  restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: target))
  checkpointer.close()
  assert jax.tree.structure(restored) == jax.tree.structure(target)
  chex.assert_trees_all_equal(restored["opt_state"], mid_state)

  resumed = run(restored["params"], restored["opt_state"], grads[5:])
  chex.assert_trees_all_equal(resumed, expected)


# --- jit, chains, stats, errors ---------------------------------------------------

ALL = {
  **{name: lambda name=name: STATEFUL[name]("zero") for name in STATEFUL},
  "skip_and_clip": lambda: clipjax.skip_and_clip(1.0, 12.0),
  "clippy": lambda: clipjax.clippy(0.1),
}


@pytest.mark.parametrize("name", list(ALL))
def test_jit_and_no_jit_agree(name):
  grads = _spiky_sequence(6, steps=5)  # short: eager steps cost ~0.3 s each
  params = _sequence(9, 1)[0]
  tx = ALL[name]()
  eager = _run(tx, grads, params, jit=False)
  jitted = _run(tx, grads, params, jit=True)
  # rtol: zclip's z-score divides a difference of close numbers.
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-7)


STATS_NAMES = {
  "autoclip": {"nonfinite_steps"},
  "zclip": {"mean", "std", "z", "nonfinite_steps"},
  "adagc": {"nonfinite_steps"},
  "quantile_clip": {"unclipped_fraction", "nonfinite_steps"},
  "spam_clip": {"nonfinite_steps"},
  "skip_and_clip": {"skipped", "skipped_steps"},
}


@pytest.mark.parametrize("name", list(STATS_NAMES))
def test_chain_and_clip_stats_names(name):
  grads = _sequence(8, 4)
  tx = optax.chain(ALL[name](), optax.sgd(0.1))
  alone = ALL[name]()
  updates, states = _run(tx, grads)
  expected, alone_states = _run(alone, grads)
  chex.assert_trees_all_close(
    updates[-1], jax.tree.map(lambda u: -0.1 * u, expected[-1]), rtol=1e-6
  )
  stats = clipjax.clip_stats(states[-1])
  fields = {"norm", "scale", "bound", "clipped_fraction"} | STATS_NAMES[name]
  per_leaf = name == "adagc"
  expected_keys = set()
  for f in fields:
    if per_leaf and f in ("norm", "scale", "bound"):
      expected_keys |= {f"{name}/{f}/a", f"{name}/{f}/b"}
    else:
      expected_keys.add(f"{name}/{f}")
  assert set(stats) == expected_keys
  norm_key = f"{name}/norm/a" if per_leaf else f"{name}/norm"
  norm_of = (lambda g: optax.tree.norm(g["a"])) if per_leaf else optax.tree.norm
  np.testing.assert_allclose(stats[norm_key], norm_of(grads[-1]), rtol=1e-6)
  if name == "zclip":
    np.testing.assert_allclose(stats["zclip/mean"], alone_states[-1].mean)


@pytest.mark.usefixtures("standard_promotion")
def test_clip_stats_finds_guards_nested_in_skip_and_clip():
  params = _sequence(3, 1)[0]
  inner = optax.named_chain(
    ("clip", clipjax.zclip(warmup_steps=2)), ("opt", optax.adam(1e-3))
  )
  tx = optax.named_chain(("guard", clipjax.skip_and_clip(1.0, 5.0, inner=inner)))
  grads = [*_sequence(4, 3), jax.tree.map(lambda x: 100.0 * x, params)]
  _, states = _run(tx, grads, params)
  stats = clipjax.clip_stats(states[-1])
  assert int(stats["guard/skip_and_clip/skipped_steps"]) == 1
  assert int(stats["guard/skip_and_clip/skipped"]) == 1
  assert "guard/clip/zclip/mean" in stats
  assert int(stats["guard/clip/zclip/nonfinite_steps"]) == 0


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: clipjax.autoclip(percentile=150), r"autoclip\(percentile=150\)"),
    (lambda: clipjax.autoclip(-1.0), r"autoclip\(percentile=-1.0\)"),
    (lambda: clipjax.autoclip(window=0), r"autoclip\(window=0\)"),
    (lambda: clipjax.autoclip(nonfinite="skip"), r"autoclip\(nonfinite='skip'\)"),
    (lambda: clipjax.zclip(alpha=1.0), r"zclip\(alpha=1.0\)"),
    (lambda: clipjax.zclip(alpha=-0.1), r"zclip\(alpha=-0.1\)"),
    (lambda: clipjax.zclip(z_thresh=0.0), r"zclip\(z_thresh=0.0\)"),
    (lambda: clipjax.zclip(warmup_steps=0), r"zclip\(warmup_steps=0\)"),
    (lambda: clipjax.zclip(warmup_steps=2.5), r"zclip\(warmup_steps=2.5\)"),
    (lambda: clipjax.zclip(mode="x"), r"zclip\(mode='x'\)"),
    (lambda: clipjax.zclip(max_norm=-1.0), r"zclip\(max_norm=-1.0\)"),
    (lambda: clipjax.adagc(warmup_steps=0), r"adagc\(warmup_steps=0\)"),
    (lambda: clipjax.adagc(relative=0.0), r"adagc\(relative=0.0\)"),
    (lambda: clipjax.adagc(beta=1.0), r"adagc\(beta=1.0\)"),
    (lambda: clipjax.adagc(warmup_max_norm=math.nan), r"adagc\(warmup_max_norm=nan"),
    (
      lambda: clipjax.quantile_clip(target_quantile=1.5),
      r"quantile_clip\(target_quantile=1.5\)",
    ),
    (
      lambda: clipjax.quantile_clip(initial_max_norm=0.0),
      r"quantile_clip\(initial_max_norm=0.0\)",
    ),
    (
      lambda: clipjax.quantile_clip(learning_rate=-0.1),
      r"quantile_clip\(learning_rate=-0.1\)",
    ),
    (lambda: clipjax.clippy(relative=-1.0), r"clippy\(relative=-1.0\)"),
    (lambda: clipjax.spam_clip(threshold=0), r"spam_clip\(threshold=0\)"),
    (lambda: clipjax.spam_clip(beta2=1.0), r"spam_clip\(beta2=1.0\)"),
    (lambda: clipjax.spam_clip(warmup_steps=0), r"spam_clip\(warmup_steps=0\)"),
    (lambda: clipjax.skip_and_clip(-1.0, 2.0), r"skip_and_clip\(max_norm=-1.0\)"),
    (
      lambda: clipjax.skip_and_clip(1.0, math.nan),
      r"skip_and_clip\(drop_norm=nan\)",
    ),
  ],
)
def test_bad_hyperparameters_raise_naming_the_call_and_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_clippy_without_params_raises():
  tx = clipjax.clippy()
  g = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="clippy needs the parameters"):
    tx.update(g, tx.init(g))
  chained = optax.chain(optax.sgd(0.1), clipjax.clippy())
  with pytest.raises(ValueError, match="clippy"):
    chained.update(g, chained.init(g))
