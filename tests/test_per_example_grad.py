"""per_example_clipped_grad: ghost norms against vmap and explicit per-example grads."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clipjax

RTOL = 1e-5  # norms, element-wise
# Sums, relative to each leaf's largest expected magnitude: float32 paths land
# within ~2e-7 of the float64 oracle here; one example is 0.1 or more of a leaf.
TOL = 1e-5


def _normal(key, shape, scale=1.0):
  return jax.random.normal(key, shape, jnp.float32) * scale


# --- plain-JAX models -------------------------------------------------------


def mlp_params(key, sizes=(12, 16, 8, 5)):
  keys = jax.random.split(key, len(sizes))
  return {
    f"layer{i}": {
      "w": _normal(keys[i], (a, b), a**-0.5),
      "b": _normal(jax.random.fold_in(keys[i], 1), (b,), 0.1),
    }
    for i, (a, b) in enumerate(itertools.pairwise(sizes))
  }


def mlp_loss(params, x, y):
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y)


def mlp_batch(key, b=10, d=12, classes=5):
  kx, ky = jax.random.split(key)
  scale = jnp.geomspace(0.1, 30.0, b)[:, None].astype(jnp.float32)
  return _normal(kx, (b, d)) * scale, jax.random.randint(ky, (b,), 0, classes)


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def block_params(key, d=8, heads=2, hidden=16):
  k = jax.random.split(key, 8)
  return {
    "ln1": {"scale": 1 + _normal(k[0], (d,), 0.1), "bias": _normal(k[1], (d,), 0.1)},
    "qkv": {"w": _normal(k[2], (d, 3 * d), d**-0.5), "b": jnp.zeros(3 * d)},
    "out": {"w": _normal(k[3], (d, d), d**-0.5), "b": _normal(k[4], (d,), 0.1)},
    "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
    "up": {"w": _normal(k[5], (d, hidden), d**-0.5), "b": jnp.zeros(hidden)},
    "down": {"w": _normal(k[6], (hidden, d), hidden**-0.5), "b": jnp.zeros(d)},
    "head": {"w": _normal(k[7], (d, 1), d**-0.5)},
    "heads": jnp.array(float(heads)),  # not a weight: read only for its shape
  }


def block_loss(params, x, y):
  """A pre-LN transformer block on (B, T, d) inputs; per-example mean-square loss."""
  b, t, d = x.shape
  heads = 2
  h = _layer_norm(x, params["ln1"]["scale"], params["ln1"]["bias"])
  qkv = h @ params["qkv"]["w"] + params["qkv"]["b"]
  q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, d // heads), 3, axis=2)
  q, k, v = (z[:, :, 0] for z in (q, k, v))
  att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // heads) ** 0.5)
  mixed = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
  x = x + mixed @ params["out"]["w"] + params["out"]["b"]
  h = _layer_norm(x, params["ln2"]["scale"], params["ln2"]["bias"])
  x = x + jax.nn.gelu(h @ params["up"]["w"] + params["up"]["b"]) @ params["down"]["w"]
  x = x + params["down"]["b"]
  pred = (x @ params["head"]["w"])[..., 0] * params["heads"]
  return jnp.mean((pred - y) ** 2, axis=-1)


def block_batch(key, b=6, t=5, d=8):
  kx, ky = jax.random.split(key)
  scale = jnp.geomspace(0.1, 10.0, b)[:, None, None].astype(jnp.float32)
  return _normal(kx, (b, t, d)) * scale, _normal(ky, (b, t))


def embed_params(key, vocab=11, d=6):
  k1, k2 = jax.random.split(key)
  return {"embed": _normal(k1, (vocab, d)), "out": _normal(k2, (d, 3), 0.5)}


def embed_loss(params, ids, y):
  h = jnp.take(params["embed"], ids, axis=0).mean(axis=1)
  return optax.softmax_cross_entropy_with_integer_labels(h @ params["out"], y)


def embed_batch(key, b=8, t=7, vocab=11):
  k1, k2 = jax.random.split(key)
  # Few distinct tokens, so that each example repeats some.
  return jax.random.randint(k1, (b, t), 0, 4) * 2, jax.random.randint(k2, (b,), 0, 3)


MODELS = {
  "mlp": (mlp_params, mlp_loss, mlp_batch),
  "transformer_block": (block_params, block_loss, block_batch),
  "embedding": (embed_params, embed_loss, embed_batch),
}


def per_example_grads(loss_fn, params, batch):
  """Each example's gradient alone, in float32: jax.grad of a batch of one, vmapped."""

  def single(p, *example):
    return loss_fn(p, *(e[None] for e in example))[0]

  grad = jax.vmap(jax.grad(single), in_axes=(None, *[0] * len(batch)))
  return jax.jit(grad)(params, *batch)


@dataclasses.dataclass(frozen=True)
class Reference:
  """The clipped sum formed outside clipjax, in numpy float64."""

  summed: list[np.ndarray]  # one per leaf, in jax.tree.leaves order
  clipped: list[np.ndarray]  # the same leaves, with a leading example axis
  norms: np.ndarray  # shape (B,): each example's norm over all its leaves


def clip_and_sum(stacked, bound) -> Reference:
  """Scales example i's whole gradient by min(1, bound / ||g_i||), then sums."""
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(stacked)]
  b = leaves[0].shape[0]
  norms = np.sqrt(sum(np.sum(g.reshape(b, -1) ** 2, axis=1) for g in leaves))
  scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
  clipped = [g * scale.reshape((b,) + (1,) * (g.ndim - 1)) for g in leaves]
  return Reference([c.sum(axis=0) for c in clipped], clipped, norms)


def explicit_reference(loss_fn, params, batch, bound) -> Reference:
  return clip_and_sum(per_example_grads(loss_fn, params, batch), bound)


def _within(got, expected, tol):
  """Each leaf within tol times its scale, element-wise (see assert_matches)."""
  top = max(np.max(np.abs(e), initial=0.0) for e in expected)
  for g, e in zip(got, expected, strict=True):
    scale = max(np.max(np.abs(e), initial=0.0), top / 10)
    if np.shape(g) != e.shape or not np.all(np.abs(g - e) <= tol * scale):
      return False
  return True


def assert_matches(grads, ref: Reference, tol=TOL):
  """grads equals the reference, to a tolerance that would see one example missing.

  The tolerance scales with each leaf's largest expected value, never with the
  bound. A leaf whose exact gradient is zero (attention's key bias: softmax
  ignores a shift) is float32 noise from the magnitudes around it, so no leaf's
  scale is below a tenth of the tree's largest value. The check that follows
  makes sure the tolerance is tight: the sum less any one example's clipped
  gradient is outside it.
  """
  got = [np.asarray(g).astype(np.float64) for g in jax.tree.leaves(grads)]
  assert len(got) == len(ref.summed)
  if not _within(got, ref.summed, tol):
    errors = [
      float(np.max(np.abs(g - e), initial=0.0))
      for g, e in zip(got, ref.summed, strict=True)
    ]
    raise AssertionError(f"absolute errors per leaf {errors}, tolerance {tol}")
  for i in range(ref.norms.shape[0]):
    less_one = [s - c[i] for s, c in zip(ref.summed, ref.clipped, strict=True)]
    assert not _within(less_one, ref.summed, tol), f"dropping example {i} passes"


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("bound", ["median", 1e6])
def test_ghost_vmap_and_explicit_agree(model, bound):
  make_params, loss_fn, make_batch = MODELS[model]
  params = make_params(jax.random.key(0))
  batch = make_batch(jax.random.key(1))
  stacked = per_example_grads(loss_fn, params, batch)
  if bound == "median":  # half the examples clipped, half untouched
    bound = float(np.median(clip_and_sum(stacked, 1.0).norms))
  ref = clip_and_sum(stacked, bound)
  for method in ("ghost", "vmap", "auto"):
    f = jax.jit(clipjax.per_example_clipped_grad(loss_fn, l2_clip=bound, method=method))
    grads, norms = f(params, *batch)
    assert norms.shape == (batch[0].shape[0],) and norms.dtype == jnp.float32
    np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
    assert_matches(grads, ref)


def test_plan_uses_ghost_for_every_dense_embedding_and_norm_parameter():
  for model in MODELS:
    make_params, loss_fn, make_batch = MODELS[model]
    params, batch = make_params(jax.random.key(0)), make_batch(jax.random.key(1))
    plan = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0).plan(params, *batch)
    assert set(plan) == set(
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    )
    assert all(v.startswith("ghost") for k, v in plan.items() if "heads" not in k), plan
  plan = clipjax.per_example_clipped_grad(block_loss, l2_clip=1.0).plan(
    block_params(jax.random.key(0)), *block_batch(jax.random.key(1))
  )
  assert plan["['qkv']['w']"] == "ghost: dense (gram)"
  assert plan["['ln1']['scale']"].startswith("ghost: elementwise")
  # The multiplier on the prediction meets the batch in a `mul`, as a scalar.
  assert plan["['heads']"].startswith("ghost: elementwise")


def test_dense_picks_outer_product_when_the_sequence_is_long():
  d_in, d_out, t = 3, 2, 8
  params = {"w": _normal(jax.random.key(0), (d_in, d_out))}
  x = _normal(jax.random.key(1), (4, t, d_in))

  def loss_fn(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"]), axis=(1, 2))

  f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=0.1)
  assert f.plan(params, x)["['w']"] == "ghost: dense (outer)"
  ref = explicit_reference(loss_fn, params, (x,), 0.1)
  grads, norms = jax.jit(f)(params, x)
  np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  assert_matches(grads, ref)


def test_unsupported_layers_fall_back_to_vmap_and_say_so():
  """A custom-JVP function and a tied weight: both fall back; the result is exact."""
  key = jax.random.key(0)
  params = {
    "shift": _normal(key, (4,)),
    "embed": _normal(jax.random.fold_in(key, 1), (9, 4)),
    "dense": _normal(jax.random.fold_in(key, 2), (4, 4)),
  }

  def loss_fn(p, signal, ids):
    feats = jnp.logaddexp(signal[:, :4], p["shift"])  # a custom_jvp rule
    h = feats + jnp.take(p["embed"], ids, axis=0)
    logits = (h @ p["dense"]) @ p["embed"].T  # the embedding is tied
    return jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]

  batch = (_normal(jax.random.key(3), (5, 6)), jnp.arange(5) % 9)
  f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0)
  plan = f.plan(params, *batch)
  assert plan["['shift']"].startswith("vmap (used by `custom_jvp_call`")
  assert plan["['embed']"] == "vmap (used by 2 layers)"
  assert plan["['dense']"] == "ghost: dense (T=1)"
  ref = explicit_reference(loss_fn, params, batch, 1.0)
  grads, norms = jax.jit(f)(params, *batch)
  np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  assert_matches(grads, ref)
  with_info = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0, return_info=True)
  _, info = jax.jit(with_info)(params, *batch)
  assert info.vmapped == ("['embed']", "['shift']")
  np.testing.assert_allclose(info.norms, ref.norms, rtol=RTOL)


def test_per_layer_bounds():
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1))
  bounds = {"layer0": 0.3, "layer1": {"w": 0.2, "b": 0.05}, "layer2": 1.0}
  for method in ("ghost", "vmap"):
    f = clipjax.per_example_clipped_grad(mlp_loss, l2_clip=bounds, method=method)
    grads, norms = jax.jit(f)(params, *batch)
    assert jax.tree.structure(norms) == jax.tree.structure(bounds)
    # Each group separately equals global clipping of that group alone.
    for group, sub_bound in [("layer0", 0.3), ("layer2", 1.0)]:

      def group_loss(sub, x, y, group=group):
        return mlp_loss({**params, group: sub}, x, y)

      ref = explicit_reference(group_loss, params[group], batch, sub_bound)
      assert_matches(grads[group], ref)
      np.testing.assert_allclose(norms[group], ref.norms, rtol=RTOL)
    for leaf, sub_bound in [("w", 0.2), ("b", 0.05)]:

      def leaf_loss(x_leaf, x, y, leaf=leaf):
        return mlp_loss({**params, "layer1": {**params["layer1"], leaf: x_leaf}}, x, y)

      ref = explicit_reference(leaf_loss, params["layer1"][leaf], batch, sub_bound)
      assert_matches(grads["layer1"][leaf], ref)
      np.testing.assert_allclose(norms["layer1"][leaf], ref.norms, rtol=RTOL)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_nonfinite_examples_are_dropped_and_counted(method):
  params = mlp_params(jax.random.key(0))
  x, y = mlp_batch(jax.random.key(1))
  bad = x.at[2, 0].set(jnp.nan).at[5, 3].set(jnp.inf)
  f = clipjax.per_example_clipped_grad(
    mlp_loss, l2_clip=1.0, method=method, return_info=True
  )
  grads, info = jax.jit(f)(params, bad, y)
  assert int(info.num_nonfinite) == 2
  assert not np.isfinite(np.asarray(info.norms)[[2, 5]]).any()
  keep = np.array([0, 1, 3, 4, 6, 7, 8, 9])
  ref = explicit_reference(mlp_loss, params, (x[keep], y[keep]), 1.0)
  assert_matches(grads, ref)
  np.testing.assert_allclose(np.asarray(info.norms)[keep], ref.norms, rtol=RTOL)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_microbatches_equal_one_batch_and_aux_is_returned(method):
  params = block_params(jax.random.key(0))
  x, y = block_batch(jax.random.key(1))

  def loss_with_aux(p, x, y):
    losses = block_loss(p, x, y)
    return losses, {"mean": losses.mean()}

  whole = clipjax.per_example_clipped_grad(
    loss_with_aux, l2_clip=0.5, method=method, has_aux=True
  )
  chunked = clipjax.per_example_clipped_grad(
    loss_with_aux, l2_clip=0.5, method=method, has_aux=True, microbatch_size=2
  )
  g1, n1, aux1 = jax.jit(whole)(params, x, y)
  g2, n2, aux2 = jax.jit(chunked)(params, x, y)
  ref = explicit_reference(block_loss, params, (x, y), 0.5)
  for grads, norms in ((g1, n1), (g2, n2)):
    assert_matches(grads, ref)
    np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  np.testing.assert_allclose(aux1["mean"], block_loss(params, x, y).mean(), rtol=RTOL)
  assert aux2["mean"].shape == (3,)  # one per microbatch
  np.testing.assert_allclose(aux2["mean"].mean(), aux1["mean"], rtol=RTOL)


def test_traced_bound_and_no_jit():
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1))
  ref = explicit_reference(mlp_loss, params, batch, 0.7)

  @jax.jit
  def step(bound):
    return clipjax.per_example_clipped_grad(mlp_loss, l2_clip=bound)(params, *batch)[0]

  assert_matches(step(jnp.float32(0.7)), ref)
  eager = clipjax.per_example_clipped_grad(mlp_loss, l2_clip=0.7)(params, *batch)[0]
  assert_matches(eager, ref)


# bfloat16 keeps 8 significant bits: each rounding is within 2**-9 (0.2%). The
# forward and backward passes round three layers' activations and gradients, and
# the sum is rounded once more, so the result sits a few roundings from the exact
# value (up to 1% of a leaf's largest entry here). 3% leaves room for that and
# is still well below one example's share (over 20% of some leaf, checked).
BF16_TOL = 3e-2


def test_bfloat16_parameters():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), mlp_params(jax.random.key(0)))
  x, y = mlp_batch(jax.random.key(1))
  x = x.astype(jnp.bfloat16)
  # The oracle: float32 gradients at the same (bfloat16-representable) values.
  as_f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  ref = explicit_reference(mlp_loss, as_f32(params), (as_f32(x), y), 1.0)
  assert (ref.norms < 1.0).any() and (ref.norms > 1.0).any()
  for method in ("ghost", "vmap"):
    f = clipjax.per_example_clipped_grad(mlp_loss, l2_clip=1.0, method=method)
    grads, norms = jax.jit(f)(params, x, y)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    assert norms.dtype == jnp.float32
    np.testing.assert_allclose(norms, ref.norms, rtol=BF16_TOL)
    assert_matches(grads, ref, tol=BF16_TOL)


# --- Flax NNX -----------------------------------------------------------------


class NNXBlock(nnx.Module):
  """Embedding, layer norm, attention built from nnx.Linear, and a head."""

  def __init__(self, vocab, d, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.q = nnx.Linear(d, d, rngs=rngs)
    self.k = nnx.Linear(d, d, rngs=rngs)
    self.v = nnx.Linear(d, d, rngs=rngs)
    self.head = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, ids):
    h = self.ln(self.embed(ids))
    q, k, v = self.q(h), self.k(h), self.v(h)
    att = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / q.shape[-1] ** 0.5)
    return self.head(jnp.einsum("bqk,bkd->bqd", att, v).mean(axis=1))


def nnx_loss(model, ids, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(ids), y)


def nnx_reference(model, batch, bound) -> Reference:
  """nnx.grad on each example alone (a loop), clipped and summed in numpy."""
  per_example = [
    nnx.grad(lambda m, i=i: nnx_loss(m, *(b[i : i + 1] for b in batch))[0])(model)
    for i in range(batch[0].shape[0])
  ]
  return clip_and_sum(jax.tree.map(lambda *g: jnp.stack(g), *per_example), bound)


def test_nnx_model_matches_nnx_grad_per_example():
  model = NNXBlock(13, 8, nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (6, 5), 0, 13)
  y = jax.random.randint(jax.random.key(2), (6,), 0, 3)

  ref = nnx_reference(model, (ids, y), 0.5)
  f = clipjax.per_example_clipped_grad(nnx_loss, l2_clip=0.5)
  plan = f.plan(model, ids, y)
  assert all(v.startswith("ghost") for v in plan.values()), plan

  @nnx.jit
  def step(model, ids, y):
    return f(model, ids, y)

  grads, norms = step(model, ids, y)
  assert isinstance(grads, nnx.State)
  np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  assert_matches(grads, ref)
  # The gradients drop straight into an nnx.Optimizer.
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  before = model.head.kernel[...]
  opt.update(model, grads)
  np.testing.assert_allclose(
    model.head.kernel[...], before - 0.1 * grads["head"]["kernel"][...], rtol=1e-6
  )


# --- errors -------------------------------------------------------------------


def test_scalar_loss_is_refused_with_a_hint():
  params = mlp_params(jax.random.key(0))
  f = clipjax.per_example_clipped_grad(
    lambda p, x, y: mlp_loss(p, x, y).mean(), l2_clip=1.0
  )
  with pytest.raises(
    ValueError, match=r"per-example losses of shape \(B,\) = \(10,\).*\.mean"
  ):
    f(params, *mlp_batch(jax.random.key(1)))


def test_mismatched_batch_sizes():
  params = mlp_params(jax.random.key(0))
  x, y = mlp_batch(jax.random.key(1))
  f = clipjax.per_example_clipped_grad(mlp_loss, l2_clip=1.0)
  with pytest.raises(ValueError, match="same leading"):
    f(params, x, y[:-1])
  with pytest.raises(ValueError, match="no batch"):
    f(params)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"l2_clip": -1.0}, r"per_example_clipped_grad\(l2_clip=-1.0\)"),
    ({"l2_clip": float("nan")}, r"l2_clip=nan"),
    ({"l2_clip": 1.0, "method": "fast"}, r"method='fast'"),
    ({"l2_clip": 1.0, "microbatch_size": 0}, r"microbatch_size=0"),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    clipjax.per_example_clipped_grad(mlp_loss, **kwargs)


def test_bad_tree_bounds_and_microbatch_sizes():
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1))
  with pytest.raises(ValueError, match=r"l2_clip(\['layer0'\])?=-2"):
    clipjax.per_example_clipped_grad(mlp_loss, l2_clip={"layer0": -2.0})(params, *batch)
  with pytest.raises(ValueError, match="prefix of the parameters"):
    clipjax.per_example_clipped_grad(mlp_loss, l2_clip={"nope": 1.0})(params, *batch)
  with pytest.raises(ValueError, match="must divide the batch size 10"):
    clipjax.per_example_clipped_grad(mlp_loss, l2_clip=1.0, microbatch_size=3)(
      params, *batch
    )


def test_integer_parameters_are_refused():
  with pytest.raises(TypeError, match=r"\['n'\] has dtype int32"):
    clipjax.per_example_clipped_grad(lambda p, x: x * p["n"], l2_clip=1.0)(
      {"n": jnp.int32(2)}, jnp.ones(3, jnp.int32)
    )


def test_batch_size_dependent_program():
  """'ghost' refuses a loss whose program depends on the batch size; 'auto' vmaps."""
  params = {"w": jnp.ones((3,))}

  def loss_fn(p, x):
    if x.shape[0] % 2:  # a different program at odd batch sizes
      return (x @ p["w"]) ** 2
    return (x @ p["w"]) ** 2 + 0.0 * jnp.sum(x, axis=1)

  x = _normal(jax.random.key(0), (4, 3))
  with pytest.raises(ValueError, match="different programs at batch sizes 4 and 5"):
    clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0, method="ghost")(params, x)
  grads, _ = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0)(params, x)
  assert_matches(grads, explicit_reference(loss_fn, params, (x,), 1.0))


class NNXClassToken(nnx.Module):
  """nnx.MultiHeadAttention (LinearGeneral projections) over a learned class token."""

  def __init__(self, rngs):
    self.att = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
    )
    self.cls = nnx.Param(jnp.ones((1, 1, 8)))
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, 8))
    return self.head(self.att(jnp.concatenate([cls, x], axis=1))[:, 0])


def test_nnx_multi_head_attention_and_a_class_token_broadcast_over_the_batch():
  model = NNXClassToken(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 5, 8))
  y = jnp.arange(4) % 3
  ghost = clipjax.per_example_clipped_grad(nnx_loss, l2_clip=0.5, method="ghost")
  plan = ghost.plan(model, x, y)
  assert plan["['cls'].value"].startswith("ghost: broadcast"), plan
  assert all(v.startswith("ghost") for v in plan.values()), plan
  vmap = clipjax.per_example_clipped_grad(nnx_loss, l2_clip=0.5, method="vmap")
  ref = nnx_reference(model, (x, y), 0.5)
  for f in (ghost, vmap):
    grads, norms = nnx.jit(f)(model, x, y)
    np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
    assert_matches(grads, ref)
