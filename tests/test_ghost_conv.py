"""Ghost norms through convolutions (issue 14), against explicit per-example grads.

Every convolution ``lax.conv_general_dilated`` can express (1-3 spatial
dimensions, strides, dilations of the input and of the kernel, explicit and
negative padding, NHWC/HWIO and NCHW/OIHW and mixed layouts, feature groups,
depthwise), by both of the rule's methods (the Gram form and the explicit
per-example kernel gradient): the per-example norms and the clipped sum equal
those of each example's gradient taken alone (``jax.grad`` of a batch of one,
vmapped), clipped and summed in numpy float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_per_example_grad import (
  RTOL,
  assert_matches,
  clip_and_sum,
  explicit_reference,
  per_example_grads,
)

import clipjax
from clipjax import _ghost

LAYOUTS = {
  1: [("NWC", "WIO", "NWC"), ("NCW", "OIW", "NCW")],
  2: [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")],
  3: [("NDHWC", "DHWIO", "NDHWC"), ("NCDHW", "OIDHW", "NCDHW")],
}


def _shape(spec: str, sizes: dict[str, int], spatial: list[int]) -> tuple[int, ...]:
  """The shape of an operand laid out as ``spec`` (e.g. ``"NHWC"``)."""
  it = iter(spatial)
  return tuple(sizes[c] if c in sizes else next(it) for c in spec)


@st.composite
def convs(draw):
  """A convolution's configuration whose output has at least one position."""
  rank = draw(st.integers(1, 3))
  layout = draw(st.sampled_from(LAYOUTS[rank]))
  groups = draw(st.sampled_from([1, 2, 3]))
  c_in = groups * draw(st.integers(1, 2))
  c_out = groups * draw(st.integers(1, 3))
  window = [draw(st.integers(1, 3)) for _ in range(rank)]
  strides = [draw(st.integers(1, 2)) for _ in range(rank)]
  lhs_dil = [draw(st.sampled_from([1, 1, 2])) for _ in range(rank)]
  rhs_dil = [draw(st.sampled_from([1, 1, 2])) for _ in range(rank)]
  side = 6 if rank < 3 else 4
  spatial = [draw(st.integers(2, side)) for _ in range(rank)]
  padding = []
  for n, k, ld, rd in zip(spatial, window, lhs_dil, rhs_dil, strict=True):
    span = (k - 1) * rd + 1
    dilated = (n - 1) * ld + 1
    lo, hi = draw(st.integers(-1, 2)), draw(st.integers(-1, 2))
    while dilated + lo + hi < span:  # at least one output position
      lo, hi = lo + 1, hi + 1
    padding.append((lo, hi))
  return dict(
    layout=layout,
    groups=groups,
    c_in=c_in,
    c_out=c_out,
    window=window,
    strides=strides,
    lhs_dilation=lhs_dil,
    rhs_dilation=rhs_dil,
    spatial=spatial,
    padding=padding,
  )


# A 2-D NHWC convolution, 3x3, stride 1, "SAME" padding: the fixed cases
# below change what they test from it.
PLAIN_2D = dict(
  layout=LAYOUTS[2][0],
  groups=1,
  c_in=4,
  c_out=4,
  window=[3, 3],
  strides=[1, 1],
  lhs_dilation=[1, 1],
  rhs_dilation=[1, 1],
  spatial=[5, 5],
  padding=[(1, 1), (1, 1)],
)


def _model(cfg, b=4):
  lhs, rhs, out = cfg["layout"]
  key = jax.random.key(0)
  kernel_shape = _shape(
    rhs, {"O": cfg["c_out"], "I": cfg["c_in"] // cfg["groups"]}, cfg["window"]
  )
  params = {"w": jax.random.normal(key, kernel_shape) * 0.5}
  x_shape = _shape(lhs, {"N": b, "C": cfg["c_in"]}, cfg["spatial"])
  scale = jnp.geomspace(0.1, 10.0, b).reshape((b,) + (1,) * (len(x_shape) - 1))
  x = jax.random.normal(jax.random.key(1), x_shape)
  x = jnp.moveaxis(jnp.moveaxis(x, lhs.index("N"), 0) * scale, 0, lhs.index("N"))

  def loss_fn(p, x):
    y = jax.lax.conv_general_dilated(
      x,
      p["w"],
      cfg["strides"],
      cfg["padding"],
      lhs_dilation=cfg["lhs_dilation"],
      rhs_dilation=cfg["rhs_dilation"],
      dimension_numbers=cfg["layout"],
      feature_group_count=cfg["groups"],
      precision=jax.lax.Precision.HIGHEST,
    )
    y = jnp.moveaxis(y, out.index("N"), 0)
    return jnp.sum(jnp.sin(y), axis=tuple(range(1, y.ndim)))

  return params, loss_fn, (x,)


def _check(params, loss_fn, batch, expect_rule, per_example=None):
  if per_example is None:
    per_example = per_example_grads(loss_fn, params, batch)
  bound = float(np.median(clip_and_sum(per_example, 1.0).norms))
  ref = clip_and_sum(per_example, bound)  # clips about half the examples
  f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=bound, method="ghost")
  plan = f.plan(params, *batch)
  assert set(plan.values()) == {expect_rule}, plan
  grads, norms = jax.jit(f)(params, *batch)
  np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  assert_matches(grads, ref)


@pytest.fixture(params=["explicit", "gram"])
def method(request, monkeypatch):
  """Forces the conv rule's method (each picks by cost; both must be exact)."""
  monkeypatch.setattr(_ghost, "conv_method", lambda tap: request.param)
  return request.param


@settings(max_examples=12, deadline=None)
@given(cfg=convs())
def test_conv_norms_and_clipped_sums_equal_explicit_per_example_grads(cfg):
  params, loss_fn, batch = _model(cfg)
  per_example = per_example_grads(loss_fn, params, batch)
  # Strides over a dilated input can see only its holes and padding.
  assume(np.all(clip_and_sum(per_example, 1.0).norms > 0))
  for how in ("explicit", "gram"):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(_ghost, "conv_method", lambda tap, how=how: how)
      _check(params, loss_fn, batch, f"ghost: conv ({how})", per_example)


@pytest.mark.parametrize("layout", [LAYOUTS[2][0], LAYOUTS[2][1]], ids=["NHWC", "NCHW"])
def test_depthwise_conv(method, layout):
  # feature_group_count = C_in: one input channel per group, two outputs each
  # (a Flax depthwise conv), which a ghost rule that ignores groups gets wrong.
  cfg = dict(PLAIN_2D, layout=layout, groups=4, c_in=4, c_out=8)
  _check(*_model(cfg), expect_rule=f"ghost: conv ({method})")


def test_the_rule_picks_the_cheaper_method():
  # 32x32 outputs, 3x3x3 -> 16: T (D + P) >> D P, the explicit product.
  few = dict(PLAIN_2D, c_in=3, c_out=16, spatial=[32, 32])
  # 2x2 outputs of 64 -> 64 channels: T (D + P) << D P, the Gram form.
  wide = dict(few, c_in=64, c_out=64, spatial=[4, 4], strides=[2, 2])
  for cfg, rule in ((few, "explicit"), (wide, "gram")):
    params, loss_fn, batch = _model(cfg, b=2)
    plan = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1.0).plan(params, *batch)
    assert plan == {"['w']": f"ghost: conv ({rule})"}


def test_bfloat16_activations(method):
  cfg = dict(
    PLAIN_2D, groups=2, strides=[2, 1], spatial=[6, 5], padding=[(1, 1), (0, 1)]
  )
  params, loss_fn, (x,) = _model(cfg)

  def bf16_loss(p, x):
    return loss_fn(
      jax.tree.map(lambda w: w.astype(jnp.bfloat16), p), x.astype(jnp.bfloat16)
    )

  x = x.astype(jnp.bfloat16)
  f = clipjax.per_example_clipped_grad(bf16_loss, l2_clip=1.0, method="ghost")
  assert f.plan(params, x) == {"['w']": f"ghost: conv ({method})"}
  grads, norms = jax.jit(f)(params, x)
  # The reference differentiates the same bfloat16 program one example at a
  # time; bfloat16's 8 bits of mantissa in the activations bound the agreement.
  ref = explicit_reference(bf16_loss, params, (x,), 1.0)
  np.testing.assert_allclose(norms, ref.norms, rtol=2e-2)
  np.testing.assert_allclose(
    grads["w"], ref.summed[0], rtol=5e-2, atol=5e-2 * np.abs(ref.summed[0]).max()
  )


class CNN(nnx.Module):
  """Two nnx.Conv (one strided, one depthwise), mean pooling, nnx.Linear."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=8, rngs=rngs)
    self.out = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv1(x))
    h = nnx.relu(self.conv2(h))
    return self.out(h.mean(axis=(1, 2)))


def test_nnx_cnn_takes_the_ghost_path_and_matches():
  model = CNN(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (6, 8, 8, 1))
  y = jnp.arange(6) % 10

  def loss_fn(m, x, y):
    logits = m(x)
    return (
      jax.nn.logsumexp(logits, axis=-1)
      - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
    )

  f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=0.5)
  plan = f.plan(model, x, y)
  assert plan["['conv1']['kernel'].value"] == "ghost: conv (explicit)", plan
  assert plan["['conv2']['kernel'].value"].startswith("ghost: conv"), plan
  assert not any(v.startswith("vmap") for v in plan.values()), plan
  graphdef, state = nnx.split(model)

  def pure(s, x, y):
    return loss_fn(nnx.merge(graphdef, s), x, y)

  ref = explicit_reference(pure, state, (x, y), 0.5)
  grads, norms = jax.jit(f)(model, x, y)
  np.testing.assert_allclose(norms, ref.norms, rtol=RTOL)
  assert_matches(jax.tree.leaves(grads), ref)


def test_windows_come_in_the_order_the_kernel_stores_them():
  # One example, one channel, a 2x3 kernel: the clipped sum (no clipping) is
  # the kernel gradient itself, which must land at each window position.
  x = jnp.arange(20.0).reshape(1, 4, 5, 1)
  params = {"w": jnp.zeros((2, 3, 1, 1))}

  def loss_fn(p, x):
    y = jax.lax.conv_general_dilated(
      x, p["w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(y, axis=(1, 2, 3))

  grads, norms = clipjax.per_example_clipped_grad(loss_fn, l2_clip=1e9)(params, x)
  xs = np.asarray(x)[0, :, :, 0]
  # The gradient of kernel entry (a, b) sums the inputs it met: a 3x3 window.
  expected = np.array(
    [[xs[a : a + 3, b : b + 3].sum() for b in range(3)] for a in range(2)]
  )
  np.testing.assert_allclose(grads["w"][..., 0, 0], expected)
  np.testing.assert_allclose(norms, [np.linalg.norm(expected)], rtol=RTOL)
