"""diloco on 8 CPU devices against numpy simulations of 8 workers in a loop.

Each worker's gradient is ``s_i (w - T_i) + C_{t,i}`` (its own target, scale
and per-step noise), so the inner steps depend on the params. The simulation
runs every worker's momentum SGD, averages the pseudo-gradients of the
fragments due, applies Nesterov SGD to the anchor and resets the workers, in
float64 numpy, knowing nothing of clipjax.
"""

import math
from itertools import pairwise

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clipjax import compression, distributed

N = 8
LR, MOM, OUTER_LR, OUTER_MOM = 0.05, 0.9, 0.7, 0.9
SHAPES = {"a": (6, 5), "b": (7,), "c": (3, 4), "d": (10,)}  # tree order a, b, c, d


def _mesh():
  return Mesh(np.array(jax.devices()[:N]), ("data",))


def _problem(steps, seed=0):
  """Initial params; per-worker targets, scales and per-step noise."""
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  targets = {k: rng.normal(size=(N, *s)).astype(np.float32) for k, s in SHAPES.items()}
  scales = np.geomspace(0.5, 2.0, N).astype(np.float32)
  noise = {
    k: (0.3 * rng.normal(size=(steps, N, *s))).astype(np.float32)
    for k, s in SHAPES.items()
  }
  return params, targets, scales, noise


def run_on_mesh(tx, steps, seed=0, poison_at=None):
  """``steps`` updates on 8 devices; each device's params and stats per update.

  Returns ``(params, anchor, stats)``: params and anchor as dicts of arrays
  shaped ``(device, step, ...)``, stats as ``diloco_stats`` per device and
  step. ``poison_at=t`` gives device 3 a NaN gradient at update ``t``.
  """
  params0, targets, scales, noise = _problem(steps, seed)
  noise = {k: np.moveaxis(v, 1, 0) for k, v in noise.items()}  # device first
  mesh = _mesh()

  @jax.jit
  @jax.shard_map(
    mesh=mesh,
    in_specs=(P(), P("data"), P("data"), P("data")),
    out_specs=P("data"),
  )
  def run(p0, t, s, c):
    t, s, c = (jax.tree.map(lambda x: x[0], v) for v in (t, s, c))
    w = jax.lax.pcast(p0, "data", to="varying")
    state = tx.init(w)
    me = jax.lax.axis_index("data")

    def step(carry, xs):
      w, state = carry
      i, noise_t = xs
      grad = jax.tree.map(lambda w, t, n: s * (w - t) + n, w, t, noise_t)
      if poison_at is not None:
        bad = (i == poison_at) & (me == 3)
        grad = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grad)
      u, state = tx.update(grad, state, w)
      w = optax.apply_updates(w, u)
      return (w, state), (w, state.anchor, distributed.diloco_stats(state))

    xs = (jnp.arange(steps), c)
    _, out = jax.lax.scan(step, (w, state), xs)
    return jax.tree.map(lambda x: x[None], out)

  out = run(params0, targets, scales, noise)
  return jax.tree.map(np.asarray, out)


def expected_cuts(sizes, fragments):
  """The documented rule, again: cut f at the leaf boundary nearest f/F."""
  prefix = [0, *np.cumsum(sizes).tolist()]
  cuts = [0]
  for f in range(1, fragments):
    target = f * prefix[-1] / fragments
    best = None
    for i in range(cuts[-1] + 1, len(sizes) - (fragments - f) + 1):
      if best is None or abs(prefix[i] - target) < abs(prefix[best] - target):
        best = i
    cuts.append(best)
  return [*cuts, len(sizes)]


def due(n, f, sync_every, fragments):
  since = n - f * (sync_every // fragments)
  return since > 0 and since % sync_every == 0


def simulate(steps, sync_every, fragments=1, seed=0, exchange=None):
  """The 8 workers in a loop; returns each worker's params after every update.

  ``exchange(f, leaf_index, pseudo_grads) -> mean`` replaces the plain mean.
  """
  params0, targets, scales, noise = _problem(steps, seed)
  keys = list(SHAPES)
  sizes = [math.prod(SHAPES[k]) for k in keys]
  cuts = expected_cuts(sizes, fragments)
  w = [{k: params0[k].astype(np.float64) for k in keys} for _ in range(N)]
  m = [{k: np.zeros(SHAPES[k]) for k in keys} for _ in range(N)]
  anchor = {k: params0[k].astype(np.float64) for k in keys}
  outer_m = {k: np.zeros(SHAPES[k]) for k in keys}
  history = []
  for t in range(steps):
    for i in range(N):
      for k in keys:
        g = scales[i] * (w[i][k] - targets[k][i]) + noise[k][t, i]
        m[i][k] = g + MOM * m[i][k]
        w[i][k] = w[i][k] - LR * m[i][k]
    for f in range(fragments):
      if not due(t + 1, f, sync_every, fragments):
        continue
      for j in range(cuts[f], cuts[f + 1]):
        k = keys[j]
        pseudo = [anchor[k] - w[i][k] for i in range(N)]
        mean = np.mean(pseudo, 0) if exchange is None else exchange(f, j, pseudo)
        outer_m[k] = mean + OUTER_MOM * outer_m[k]
        anchor[k] = anchor[k] - OUTER_LR * (mean + OUTER_MOM * outer_m[k])
        for i in range(N):
          w[i][k] = anchor[k].copy()
    history.append([{k: v.copy() for k, v in wi.items()} for wi in w])
  return history


def _nesterov():
  return optax.sgd(OUTER_LR, momentum=OUTER_MOM, nesterov=True)


def _tx(**kw):
  return distributed.diloco(
    optax.sgd(LR, momentum=MOM), _nesterov(), axis_name="data", **kw
  )


def _at(tree, device, step):
  return {k: v[device, step] for k, v in tree.items()}


@pytest.mark.parametrize(("sync_every", "fragments"), [(4, 1), (6, 3)])
def test_params_equal_a_simulation_of_8_workers(sync_every, fragments):
  steps = 3 * sync_every + 2
  params, _, stats = run_on_mesh(_tx(sync_every=sync_every, fragments=fragments), steps)
  history = simulate(steps, sync_every, fragments)
  for t in (sync_every - 1, 2 * sync_every, steps - 1):
    for device in (0, 5, 7):
      got, want = _at(params, device, t), history[t][device]
      for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-5, err_msg=k)
  # The schedule: which fragment each update synced, against the formula.
  for t in range(steps):
    fired = [f for f in range(fragments) if due(t + 1, f, sync_every, fragments)]
    assert len(fired) <= 1
    assert stats["diloco/fragment"][0, t] == (fired[0] if fired else -1)


def test_devices_agree_right_after_syncs_and_differ_between():
  sync_every, fragments = 6, 3
  steps = 3 * sync_every
  params, anchor, _ = run_on_mesh(
    _tx(sync_every=sync_every, fragments=fragments), steps
  )
  keys = list(SHAPES)
  cuts = expected_cuts([math.prod(SHAPES[k]) for k in keys], fragments)
  assert cuts == [0, 1, 2, 4]  # a (30), b (7), c and d (22): by element counts
  fragment_of = {keys[j]: f for f in range(3) for j in range(cuts[f], cuts[f + 1])}
  for t in range(1, steps):
    for k in keys:
      # The anchor is the same on every device, bit for bit, at every update.
      for device in range(1, N):
        np.testing.assert_array_equal(anchor[k][device, t], anchor[k][0, t])
      spread = np.max(np.abs(params[k][:, t] - params[k][:1, t]))
      if due(t + 1, fragment_of[k], sync_every, fragments):
        # params + (anchor - params) is the anchor up to one rounding of the
        # sum: an ulp of the larger of the two (bit for bit where they are
        # within a factor 2 of each other).
        before = np.max(np.abs(params[k][:, t - 1]), axis=0) * 4  # local steps
        ulp = np.spacing(np.maximum(before, np.abs(anchor[k][0, t])))
        assert np.all(np.abs(params[k][:, t] - anchor[k][0, t]) <= ulp), (k, t)
        assert np.mean(params[k][:, t] == anchor[k][0, t]) > 0.5
      else:
        assert spread > 1e-3, (k, t)  # the devices' own steps


def test_sync_every_1_with_sgd_outer_1_is_data_parallel_sgd():
  steps = 5
  tx = distributed.diloco(optax.sgd(LR), optax.sgd(1.0), sync_every=1, axis_name="data")
  params, _, stats = run_on_mesh(tx, steps)
  # Data-parallel SGD, one worker at a time: w -= lr * mean_i(grad_i(w)).
  params0, targets, scales, noise = _problem(steps)
  w = {k: v.astype(np.float64) for k, v in params0.items()}
  for t in range(steps):
    for k in SHAPES:
      grads = [scales[i] * (w[k] - targets[k][i]) + noise[k][t, i] for i in range(N)]
      w[k] = w[k] - LR * np.mean(grads, 0)
    for k in SHAPES:
      for device in range(N):
        np.testing.assert_allclose(params[k][device, t], w[k], rtol=1e-5, atol=1e-6)
  assert np.all(stats["diloco/fragment"] == 0)


def _ring(nbytes):
  return (2 * (N - 1) * nbytes + N - 1) // N


@pytest.mark.parametrize(
  ("compressor", "fragments", "payload"),
  [
    (None, 1, lambda size: _ring(4 * size)),
    (None, 2, lambda size: _ring(4 * size)),
    # top-k gathers k values and k int32 indices from each of the N-1 others.
    (compression.top_k(0.1), 1, lambda size: (N - 1) * 8 * math.ceil(0.1 * size)),
    (compression.cast(jnp.bfloat16), 2, lambda size: _ring(2 * size)),
  ],
)
def test_bytes_against_the_formula(compressor, fragments, payload):
  sync_every, steps = 4, 8
  tx = _tx(sync_every=sync_every, fragments=fragments, compressor=compressor)
  _, _, stats = run_on_mesh(tx, steps)
  keys = list(SHAPES)
  sizes = [math.prod(SHAPES[k]) for k in keys]
  cuts = expected_cuts(sizes, fragments)
  per_fragment = [sum(payload(s) for s in sizes[a:b]) for a, b in pairwise(cuts)]
  dense = sum(_ring(4 * s) for s in sizes)
  for t in range(steps):
    fired = [f for f in range(fragments) if due(t + 1, f, sync_every, fragments)]
    want = per_fragment[fired[0]] if fired else 0
    assert stats["diloco/bytes_sent"][0, t] == want
    assert stats["diloco/bytes_received"][0, t] == want
  per_step = sum(per_fragment) / sync_every
  np.testing.assert_allclose(stats["diloco/bytes_per_step"][0, -1], per_step)
  assert stats["diloco/dense_bytes"][0, -1] == dense
  np.testing.assert_allclose(stats["diloco/ratio"][0, -1], dense / per_step, rtol=1e-6)
  # Any sync_every updates after the first sync_every sync each fragment once.
  window = stats["diloco/bytes_sent"][0, -sync_every:].sum()
  np.testing.assert_allclose(window / sync_every, per_step)


def _top_k_mean_with_error_feedback(ratio, decay=1.0):
  """numpy: each worker sends top-k of pseudo + decay * residual, keeps the rest."""
  residual = {}

  def exchange(f, j, pseudo):
    sent = []
    for i, x in enumerate(pseudo):
      x = x + decay * residual.get((i, j), 0.0)
      flat = x.ravel()
      k = max(1, math.ceil(round(ratio * flat.size, 6)))
      keep = np.argsort(-np.abs(flat), kind="stable")[:k]
      s = np.zeros_like(flat)
      s[keep] = flat[keep]
      s = s.reshape(x.shape)
      residual[i, j] = x - s
      sent.append(s)
    return np.mean(sent, 0)

  return exchange


@pytest.mark.parametrize(
  ("feedback", "decay"),
  [("error_feedback", 1.0), (compression.error_feedback(decay=0.5), 0.5)],
)
def test_top_k_pseudo_gradients_with_error_feedback_equal_the_simulation(
  feedback, decay
):
  sync_every, steps = 3, 10
  tx = _tx(sync_every=sync_every, compressor=compression.top_k(0.25), feedback=feedback)
  params, _, _ = run_on_mesh(tx, steps)
  exchange = _top_k_mean_with_error_feedback(0.25, decay)
  history = simulate(steps, sync_every, exchange=exchange)
  for t in (2, 5, steps - 1):
    for device in (0, 4):
      for k in SHAPES:
        np.testing.assert_allclose(
          params[k][device, t], history[t][device][k], rtol=1e-4, atol=1e-5
        )


def test_bfloat16_pseudo_gradients_track_the_uncompressed_run():
  sync_every, steps = 4, 12
  tx = _tx(sync_every=sync_every, compressor=compression.cast(jnp.bfloat16))
  _, anchor, stats = run_on_mesh(tx, steps)
  history = simulate(steps, sync_every)
  for k in SHAPES:
    np.testing.assert_allclose(anchor[k][0, -1], history[-1][0][k], rtol=0, atol=0.02)
  labels = [k for k in stats if k.startswith("diloco/")]
  assert len(labels) == 6


def test_compression_stats_read_the_exchange_of_the_last_sync():
  tx = _tx(sync_every=2, compressor=compression.top_k(0.1), fragments=2)
  mesh = _mesh()
  params0, *_ = _problem(1)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=P())
  def names(p0):
    w = jax.lax.pcast(p0, "data", to="varying")
    state = tx.init(w)
    _, state = tx.update(w, state, w)
    stats = compression.compression_stats(state)
    return {k: jax.lax.pmax(v, "data") for k, v in stats.items()}

  stats = names(params0)
  assert "top_k/ratio" in stats and "top_k_1/ratio" in stats  # one per fragment


def test_a_nan_gradient_guarded_by_the_inner_optimizer_stays_local():
  inner = optax.apply_if_finite(optax.sgd(LR, momentum=MOM), 3)
  tx = distributed.diloco(inner, _nesterov(), sync_every=4, axis_name="data")
  # Device 3's gradient is NaN at update 5; it skips that inner step alone.
  params, anchor, _ = run_on_mesh(tx, 10, poison_at=5)
  for k in SHAPES:
    assert np.all(np.isfinite(params[k])) and np.all(np.isfinite(anchor[k]))
    np.testing.assert_array_equal(params[k][3, 5], params[k][3, 4])  # skipped
    assert not np.array_equal(params[k][0, 5], params[k][0, 4])  # the others moved
    for device in range(1, N):
      np.testing.assert_array_equal(anchor[k][device, -1], anchor[k][0, -1])


def test_orbax_round_trip_of_the_state(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = _tx(sync_every=3, compressor=compression.top_k(0.2), fragments=2)
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(a, b, strict=True)


def test_bad_arguments_name_diloco_the_argument_and_the_value():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"diloco\(sync_every=0\)"):
    distributed.diloco(sgd, sgd, sync_every=0, axis_name="data")
  with pytest.raises(ValueError, match=r"diloco\(sync_every=True\)"):
    distributed.diloco(sgd, sgd, sync_every=True, axis_name="data")
  with pytest.raises(ValueError, match=r"diloco\(fragments=0\)"):
    distributed.diloco(sgd, sgd, sync_every=4, axis_name="data", fragments=0)
  with pytest.raises(ValueError, match=r"diloco\(fragments=5\).*sync_every=4"):
    distributed.diloco(sgd, sgd, sync_every=4, axis_name="data", fragments=5)
  with pytest.raises(TypeError, match=r"diloco\(inner=.*GradientTransformation"):
    distributed.diloco(lambda g: g, sgd, sync_every=4, axis_name="data")
  with pytest.raises(TypeError, match=r"diloco\(outer='sgd'\)"):
    distributed.diloco(sgd, "sgd", sync_every=4, axis_name="data")
  with pytest.raises(TypeError, match=r"diloco\(compressor='int8'\)"):
    distributed.diloco(sgd, sgd, sync_every=4, axis_name="data", compressor="int8")
  with pytest.raises(ValueError, match=r"diloco\(feedback='momentum'\)"):
    distributed.diloco(sgd, sgd, sync_every=4, axis_name="data", feedback="momentum")
  with pytest.raises(TypeError, match=r"diloco\(feedback=0.9\) must be a Feedback"):
    distributed.diloco(sgd, sgd, sync_every=4, axis_name="data", feedback=0.9)
  with pytest.raises(ValueError, match=r"diloco\(exchange='gossip'\)"):
    distributed.diloco(
      sgd,
      sgd,
      sync_every=4,
      axis_name="data",
      compressor=compression.top_k(0.1),
      exchange="gossip",
    )
  tx = distributed.diloco(sgd, sgd, sync_every=4, axis_name="data", fragments=3)
  with pytest.raises(ValueError, match=r"diloco\(fragments=3\).*the 2 leaves"):
    tx.init({"w": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(TypeError, match=r"diloco: leaf .* int32"):
    tx.init({"w": jnp.ones(3), "b": jnp.ones(2), "n": jnp.ones(2, jnp.int32)})


def test_update_errors_name_diloco():
  tx = distributed.diloco(
    optax.sgd(0.1), optax.sgd(1.0), sync_every=2, axis_name="data"
  )
  w = jnp.ones((8, 3))
  state = tx.init(w)
  with pytest.raises(ValueError, match=r"diloco: update needs the params"):
    tx.update(w, state)
  with pytest.raises(ValueError, match=r"diloco\(axis_name='data'\): no mesh axis"):
    tx.update(w, state, w)
  mesh = _mesh()

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=P())
  def replicated(w):  # jax.grad of replicated params: already summed
    grads = jax.grad(lambda w: jnp.sum(w**2))(w)
    return tx.update(grads, tx.init(w), w)[0]

  with pytest.raises(ValueError, match=r"diloco\(axis_name='data'\).*same on every"):
    replicated(w)


COLLECTIVES = {
  "psum",
  "psum_invariant",
  "pmin",
  "pmax",
  "all_gather",
  "all_gather_invariant",
  "all_to_all",
  "ppermute",
  "psum_scatter",
  "reduce_scatter",
}


def _collectives(jaxpr, in_cond=None, found=None):
  """``[(primitive, index of the enclosing top-level cond or None)]``."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in COLLECTIVES:
      found.append((eqn.primitive.name, in_cond))
    for value in eqn.params.values():
      for sub in value if isinstance(value, list | tuple) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          where = in_cond
          if in_cond is None and eqn.primitive.name == "cond":
            where = id(eqn)
          _collectives(inner, where, found)
  return found


@pytest.mark.parametrize("compressor", [None, compression.top_k(0.1)])
def test_collectives_run_only_in_the_sync_branches(compressor):
  tx = _tx(sync_every=6, fragments=3, compressor=compressor)

  @jax.shard_map(mesh=_mesh(), in_specs=P("data"), out_specs=P("data"))
  def one_update(w):
    w = {k: w[0, : math.prod(s)].reshape(s) for k, s in SHAPES.items()}
    updates, _ = tx.update(w, tx.init(w), w)
    return updates["a"][None]

  jaxpr = jax.make_jaxpr(one_update)(jnp.ones((N, 30)))
  found = _collectives(jaxpr.jaxpr)
  assert found and all(cond is not None for _, cond in found), found
  assert len({cond for _, cond in found}) == 3  # one cond per fragment
