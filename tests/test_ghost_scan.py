"""Ghost norms through scanned layers (issue 14), against explicit per-example grads.

Parameters stacked along a ``scan``'s axis (a layer stack, as ``nnx.scan`` over
blocks) and parameters the body closes over (the same weight at every
iteration), through ``lax.scan``, ``nnx.scan``, ``fori_loop``, ``jax.checkpoint``
in and around the body, reversed scans and carries that become batched: the
per-example norms and the clipped sum equal those of each example's gradient
taken alone (``jax.grad`` of a batch of one, vmapped), clipped and summed in
numpy float64. What the rule does not cover falls back to ``vmap`` for that
leaf alone, and ``plan()`` says why.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_per_example_grad import (
  RTOL,
  assert_matches,
  clip_and_sum,
  explicit_reference,
  per_example_grads,
)

import clipjax


def _normal(key, shape, scale=1.0):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale


def _batch(b, *shape):
  scale = jnp.geomspace(0.1, 10.0, b).reshape((b,) + (1,) * len(shape))
  return _normal(99, (b, *shape)) * scale


def _check(loss_fn, params, batch, plan=None):
  """Norms and the clipped sum (about half the examples clipped) against the
  explicit per-example gradients; ``plan`` entries, if given, must match."""
  per_example = per_example_grads(loss_fn, params, batch)
  bound = float(np.median(clip_and_sum(per_example, 1.0).norms))
  ref = clip_and_sum(per_example, bound)
  f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=bound)
  got_plan = f.plan(params, *batch)
  for name, line in (plan or {}).items():
    assert got_plan[name] == line, got_plan
  grads, norms = jax.jit(f)(params, *batch)
  np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  assert_matches(jax.tree.leaves(grads), ref)
  return got_plan


def stack_params(length, d, seed=0):
  return {
    "w": _normal(seed, (length, d, d), d**-0.5 * 1.5),
    "b": _normal(seed + 1, (length, d), 0.1),
    "shared": _normal(seed + 2, (d, d), d**-0.5),
    "scale": 1.0 + _normal(seed + 3, (d,), 0.1),
  }


def stack_loss(p, x, *, reverse=False, remat=False):
  """Per iteration a stacked dense layer and bias, a closed-over scale and weight."""

  def body(h, w):
    h = jnp.tanh(h @ w["w"] + w["b"]) * p["scale"]
    return h @ p["shared"], None

  if remat:
    body = jax.checkpoint(body)
  h, _ = jax.lax.scan(body, x, {"w": p["w"], "b": p["b"]}, reverse=reverse)
  return jnp.sum(jnp.sin(h), axis=tuple(range(1, h.ndim)))


@settings(max_examples=8, deadline=None)
@given(
  length=st.integers(1, 5),
  positions=st.sampled_from([(), (1,), (3,)]),
  d=st.sampled_from([3, 6]),
  reverse=st.booleans(),
)
def test_stacked_and_closed_over_dense_layers(length, positions, d, reverse):
  params = stack_params(length, d)
  x = _batch(5, *positions, d)

  def loss(p, x):
    return stack_loss(p, x, reverse=reverse)

  scan = f"in scan (L={length}"
  plan = _check(loss, params, (x,))
  assert (
    plan["['w']"].startswith("ghost: dense") and f"{scan}, stacked)" in plan["['w']"]
  )
  assert plan["['shared']"].endswith(f"{scan}, closed over)"), plan
  assert plan["['b']"] == f"ghost: elementwise (per-example, small) {scan}, stacked)"
  assert plan["['scale']"].endswith("closed over)"), plan


@pytest.mark.parametrize("where", ["inside", "around"])
def test_checkpointed_bodies(where):
  params = stack_params(4, 5)
  x = _batch(4, 3, 5)
  if where == "inside":
    loss = lambda p, x: stack_loss(p, x, remat=True)
  else:
    loss = jax.checkpoint(lambda p, x: stack_loss(p, x))
  plan = _check(loss, params, (x,))
  assert not any(v.startswith("vmap") for v in plan.values()), plan


def test_fori_loop_closes_over_its_weight():
  # fori_loop with a static trip count lowers to a scan over nothing: the
  # weight is closed over, a dense layer applied 3 times to the same input
  # stream, with cross-iteration terms in its gradient's norm.
  params = {"w": _normal(0, (4, 4), 0.6), "b": _normal(1, (4,), 0.1)}
  x = _batch(6, 2, 4)

  def loss(p, x):
    h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"] + p["b"]), x)
    return jnp.sum(h, axis=(1, 2))

  plan = _check(loss, params, (x,))
  assert plan["['w']"].endswith("in scan (L=3, closed over)"), plan


def test_a_carry_that_becomes_batched_and_stacked_embeddings():
  # The carry starts as zeros (no batch dimension yet); each iteration looks up
  # its own embedding table (stacked) and a stacked convolution reads the carry.
  vocab, d = 7, 4
  params = {
    "emb": _normal(0, (3, vocab, d)),
    "conv": _normal(1, (3, 3, d, d), 0.3),  # stacked WIO kernels
  }
  ids = (jnp.arange(5 * 6).reshape(5, 6) * 3) % vocab

  def loss(p, ids):
    def body(h, w):
      e = jnp.take(w["emb"], ids, axis=0)  # (B, T, d)
      y = jax.lax.conv_general_dilated(
        h + e, w["conv"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
      )
      return jnp.tanh(y), None

    h0 = jnp.zeros((ids.shape[0], ids.shape[1], d))
    h, _ = jax.lax.scan(body, h0, p)
    return jnp.sum(h, axis=(1, 2))

  plan = _check(loss, params, (ids,))
  assert plan["['emb']"] == "ghost: embedding in scan (L=3, stacked)"
  assert plan["['conv']"].startswith("ghost: conv") and "stacked" in plan["['conv']"]


def test_what_the_rule_does_not_cover_falls_back_alone():
  # A closed-over convolution kernel, a parameter in the carry, and a scan
  # over the examples themselves: vmap for those leaves, ghost for the rest.
  params = {
    "conv": _normal(0, (3, 2, 2), 0.5),
    "h0": _normal(1, (2,)),
    "w": _normal(2, (2, 2, 2)),
    "v": _normal(3, (2, 2)),
  }
  x = _batch(5, 4, 2)

  def loss(p, x):
    def body(h, w):
      y = jax.lax.conv_general_dilated(
        h, p["conv"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
      )
      return jnp.tanh(y @ w), None

    h, _ = jax.lax.scan(body, x, p["w"])
    carry, _ = jax.lax.scan(lambda c, _: (c * 0.5, None), p["h0"], None, length=2)
    per_row = jax.lax.scan(lambda c, row: (c, jnp.sum(row @ p["v"])), 0.0, h)[1]
    return jnp.sum(h * carry, axis=(1, 2)) + per_row

  plan = _check(loss, params, (x,))
  assert plan["['conv']"] == (
    "vmap (used by `conv_general_dilated` and closed over by `scan`)"
  ), plan
  assert plan["['h0']"] == "vmap (carried by `scan`)", plan
  assert plan["['v']"] == "vmap (used by `scan`)", plan
  assert plan["['w']"] == "ghost: dense (outer) in scan (L=2, stacked)", plan


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=2, in_features=d, decode=False, rngs=rngs
    )
    self.fc = nnx.Linear(d, 2 * d, rngs=rngs)
    self.proj = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln(x))
    return x + self.proj(nnx.gelu(self.fc(x)))


class ScannedTransformer(nnx.Module):
  """Blocks stacked with nnx.vmap and run with nnx.scan, as JAX LLM code is."""

  def __init__(self, vocab, d, blocks, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)

    @nnx.split_rngs(splits=blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(d, rngs)

    self.blocks = make(rngs)
    self.out = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, ids):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.out(run(self.embed(ids), self.blocks))


def test_nnx_scan_over_transformer_blocks():
  vocab, d, blocks = 11, 8, 3
  model = ScannedTransformer(vocab, d, blocks, nnx.Rngs(0))
  ids = (jnp.arange(4 * 5).reshape(4, 5) * 7) % vocab

  def loss_fn(m, ids):
    logits = m(ids)
    return jnp.sum(jax.nn.logsumexp(logits, -1) - logits[..., 0], axis=-1)

  f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0)
  plan = f.plan(model, ids)
  block_lines = {k: v for k, v in plan.items() if k.startswith("['blocks']")}
  assert block_lines and all(
    v.startswith("ghost") and f"in scan (L={blocks}, stacked)" in v
    for v in block_lines.values()
  ), block_lines
  graphdef, state = nnx.split(model)
  pure = lambda s, ids: loss_fn(nnx.merge(graphdef, s), ids)
  per_example = per_example_grads(pure, state, (ids,))
  bound = float(np.median(clip_and_sum(per_example, 1.0).norms))
  ref = clip_and_sum(per_example, bound)
  grads, norms = jax.jit(clipjax.per_example_clipped_grad(loss_fn, l2_clip=bound))(
    model, ids
  )
  np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  assert_matches(jax.tree.leaves(grads), ref)


def test_microbatches_through_a_scan_equal_one_batch():
  params = stack_params(3, 4)
  x = _batch(8, 2, 4)
  one = clipjax.per_example_clipped_grad(stack_loss, l2_clip=0.5)
  chunks = clipjax.per_example_clipped_grad(stack_loss, l2_clip=0.5, microbatch_size=4)
  (g1, n1), (g2, n2) = jax.jit(one)(params, x), jax.jit(chunks)(params, x)
  np.testing.assert_allclose(n1, n2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  ref = explicit_reference(stack_loss, params, (x,), 0.5)
  assert_matches(g1, ref)
