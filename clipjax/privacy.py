"""Differential privacy: DP-SGD's noise, its privacy accounting, adaptive clipping.

DP-SGD (Abadi et al., 2016) takes, at every step, a batch in which each example
was included independently with probability ``q`` (Poisson sampling), clips each
example's gradient to L2 norm ``C``, sums them, adds Gaussian noise of standard
deviation ``z * C`` (``z`` is the noise multiplier) and divides by the expected
batch size. The pieces here:

- :func:`gaussian_noise` adds the noise, as an optax transformation whose state
  carries the PRNG key (deterministic given the key, checkpointable);
- :func:`dp_sgd` is the preset ``noise -> / batch size -> optax.sgd``, whose
  input is the clipped sum that ``clipjax.per_example_clipped_grad`` returns;
- :func:`epsilon` and :func:`noise_multiplier_for` account for ``steps`` such
  steps with Google's ``dp_accounting`` (``pip install 'optax-clipjax[privacy]'``),
  imported only when called;
- :func:`adaptive_clip_init`, :func:`adaptive_clip_update` and
  :func:`adjusted_noise_multiplier` learn ``C`` privately as a quantile of the
  per-example norms (Andrew et al., 2021).

The accounting is for the add-or-remove-one-example relation and assumes
Poisson sampling. Training on shuffled fixed-size batches and accounting with
``sample_rate = batch_size / n`` is a common approximation, not a guarantee.
"""

import math
import numbers
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax import _norms
from clipjax._checks import check_bound, is_concrete

__all__ = (
  "AdaptiveClipState",
  "GaussianNoiseState",
  "adaptive_clip_init",
  "adaptive_clip_update",
  "adjusted_noise_multiplier",
  "dp_sgd",
  "epsilon",
  "gaussian_noise",
  "noise_multiplier_for",
)

Accountant = Literal["rdp", "pld"]
_ACCOUNTANTS = ("rdp", "pld")


# --- Checks -----------------------------------------------------------------------


def _check_key(call: str, key: Any) -> None:
  """Raises unless ``key`` is a typed key or a raw ``uint32`` key array."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and (
    jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    or (dtype == np.uint32 and np.ndim(key) >= 1)
  ):
    return
  raise ValueError(
    f"{call}(key={key!r}) must be a PRNG key: jax.random.key(seed) or"
    " jax.random.PRNGKey(seed)."
  )


def _check_interval(
  call: str, name: str, value: Any, low: float, high: float, closed: str
) -> None:
  """Raises unless a concrete ``value`` lies between ``low`` and ``high``.

  ``closed`` says which ends belong to the interval: ``"both"``, ``"high"``,
  ``"low"`` or ``"neither"``.
  """
  if not is_concrete(value):
    return
  try:
    v = float(np.asarray(value, dtype=np.float64))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{call}({name}={value!r}) must be a number.") from e
  above = v >= low if closed in ("both", "low") else v > low
  below = v <= high if closed in ("both", "high") else v < high
  if not (above and below):
    left = "[" if closed in ("both", "low") else "("
    right = "]" if closed in ("both", "high") else ")"
    raise ValueError(
      f"{call}({name}={value!r}) must be in {left}{low:g}, {high:g}{right}."
    )


def _check_steps(call: str, steps: Any) -> int:
  if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
    raise ValueError(f"{call}(steps={steps!r}) must be an int >= 0.")
  return int(steps)


def _check_accounting(
  call: str, sample_rate: Any, steps: Any, delta: Any, accountant: Any
) -> int:
  """Checks the arguments shared by the accounting functions; returns ``steps``."""
  _check_interval(call, "sample_rate", sample_rate, 0.0, 1.0, "high")
  _check_interval(call, "delta", delta, 0.0, 1.0, "neither")
  if accountant not in _ACCOUNTANTS:
    raise ValueError(
      f"{call}(accountant={accountant!r}) must be one of {_ACCOUNTANTS}."
    )
  return _check_steps(call, steps)


# --- Noise ------------------------------------------------------------------------


class GaussianNoiseState(NamedTuple):
  """The PRNG key of the next draw and the number of draws so far.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import privacy
    >>> tx = privacy.gaussian_noise(1.0, jax.random.key(0))
    >>> tx.init(jnp.zeros(3)).count
    Array(0, dtype=int32)
  """

  key: jax.Array  # a typed key or a raw uint32 key, as given; split every update
  count: jax.Array  # type: ignore[assignment]  # shape=(), int32: updates so far


def _noised_leaf(x: jax.Array, key: jax.Array, stddev: Any) -> jax.Array:
  """``x + N(0, stddev^2)``, drawn and added in float32 (float64 for float64)."""
  acc = _norms.accumulation_dtype(x.dtype)
  noise = jax.random.normal(key, x.shape, acc) * jnp.asarray(stddev).astype(acc)
  return (x.astype(acc) + noise).astype(x.dtype)


def gaussian_noise(
  stddev: jax.typing.ArrayLike, key: jax.Array
) -> optax.GradientTransformation:
  """Adds independent ``N(0, stddev^2)`` noise to every element of every leaf.

  The noise is drawn in float32 (float64 for float64 leaves), added there and
  the sum rounded once to the leaf's dtype. The state holds the key, split at
  every update, so a run is reproducible from ``key`` and can be checkpointed
  and resumed; the noise of one update does not depend on the leaf values.
  ``None`` leaves stay ``None``.

  Args:
    stddev: the standard deviation; a number (>= 0, finite) or a traced scalar
      (so that ``jax.vmap`` over a stack of states and stddevs works).
    key: the PRNG key of the first update, from ``jax.random.key`` or
      ``jax.random.PRNGKey``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`GaussianNoiseState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import privacy
    >>> tx = privacy.gaussian_noise(0.1, jax.random.key(0))
    >>> g = {"w": jnp.zeros((1000,)), "b": None}
    >>> state = tx.init(g)
    >>> u, state = tx.update(g, state)
    >>> print(round(float(jnp.std(u["w"])), 1), u["b"], state.count)
    0.1 None 1
    >>> u2, _ = tx.update(g, tx.init(g))  # the same key: the same noise
    >>> bool(jnp.all(u2["w"] == u["w"]))
    True

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.
  """
  call = "gaussian_noise"
  check_bound(call, "stddev", stddev)
  _check_key(call, key)

  def init_fn(params):
    del params
    return GaussianNoiseState(key, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    _norms.check_float_leaves(
      call,
      updates,
      real=True,
      why=(
        "Gaussian noise needs real floating-point updates (mask other leaves out"
        " with optax.masked)"
      ),
    )
    leaves, treedef = jax.tree.flatten(updates)
    next_key, draw_key = jax.random.split(state.key)
    keys = jax.random.split(draw_key, len(leaves))
    noised = [_noised_leaf(x, keys[i], stddev) for i, x in enumerate(leaves)]
    new_state = GaussianNoiseState(next_key, optax.safe_increment(state.count))
    return jax.tree.unflatten(treedef, noised), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def dp_sgd(
  learning_rate: optax.ScalarOrSchedule,
  l2_clip: jax.typing.ArrayLike,
  noise_multiplier: jax.typing.ArrayLike,
  key: jax.Array,
  *,
  batch_size: jax.typing.ArrayLike,
  momentum: float | None = None,
  nesterov: bool = False,
) -> optax.GradientTransformation:
  """DP-SGD: noises a sum of clipped per-example gradients, averages, steps.

  ``optax.chain(gaussian_noise(noise_multiplier * l2_clip, key),
  optax.scale(1 / batch_size), optax.sgd(learning_rate, momentum, nesterov))``.
  Its input must be the sum over the batch of per-example gradients each
  clipped to L2 norm ``l2_clip``, which is what
  ``clipjax.per_example_clipped_grad(loss_fn, l2_clip=l2_clip)`` returns: this
  transformation clips nothing, and ``l2_clip`` only sets the noise.

  The state does not depend on ``l2_clip`` or ``noise_multiplier``, so a
  jitted step may rebuild ``dp_sgd`` with this step's traced clip (adaptive
  clipping, see :func:`adaptive_clip_update`) and pass it the same state; the
  key is used only by ``init``.

  Args:
    learning_rate: a number or an optax schedule.
    l2_clip: the bound each example's gradient was clipped to (> 0).
    noise_multiplier: ``z`` (>= 0): the noise's stddev is ``z * l2_clip``.
    key: the PRNG key of the noise (see :func:`gaussian_noise`).
    batch_size: the expected batch size (``sample_rate * n`` under Poisson
      sampling; the batch size for fixed-size batches) that the noised sum is
      divided by.
    momentum: as in ``optax.sgd`` (>= 0, or None for none).
    nesterov: as in ``optax.sgd``.

  Returns:
    An ``optax.GradientTransformation``; its state is the chain's tuple, whose
    first element is a :class:`GaussianNoiseState`.

  Examples:
    >>> import jax, jax.numpy as jnp, clipjax
    >>> from clipjax import privacy
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> summed, _ = clipjax.per_example_global_norm_clip(per_example, 1.0)
    >>> tx = privacy.dp_sgd(0.5, 1.0, 0.0, jax.random.key(0), batch_size=2)
    >>> u, state = tx.update(summed, tx.init(summed))
    >>> print(u["w"])  # no noise: -0.5 * (0.6 + 0.3, 0.8 + 0.4) / 2
    [-0.225 -0.3  ]

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.
  """
  call = "dp_sgd"
  if not callable(learning_rate):
    check_bound(call, "learning_rate", learning_rate)
  check_bound(call, "l2_clip", l2_clip, positive=True)
  check_bound(call, "noise_multiplier", noise_multiplier)
  check_bound(call, "batch_size", batch_size, positive=True)
  if momentum is not None:
    check_bound(call, "momentum", momentum)
  _check_key(call, key)
  return optax.chain(
    gaussian_noise(noise_multiplier * l2_clip, key),
    optax.scale(1.0 / batch_size),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


# --- Accounting -------------------------------------------------------------------


def _dp_accounting(call: str) -> Any:
  try:
    import dp_accounting
  except ImportError as e:
    raise ImportError(
      f"clipjax.privacy.{call} needs dp-accounting:"
      " pip install 'optax-clipjax[privacy]'"
    ) from e
  return dp_accounting


def _event(dp: Any, noise_multiplier: float, sample_rate: float, steps: int) -> Any:
  """``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
  step = dp.PoissonSampledDpEvent(
    float(sample_rate), dp.GaussianDpEvent(float(noise_multiplier))
  )
  return dp.SelfComposedDpEvent(step, steps)


def _new_accountant(dp: Any, accountant: str) -> Any:
  if accountant == "pld":
    return dp.pld.PLDAccountant()
  return dp.rdp.RdpAccountant()


def epsilon(
  noise_multiplier: float,
  sample_rate: float,
  steps: int,
  delta: float,
  *,
  accountant: Accountant = "rdp",
) -> float:
  """The epsilon of ``steps`` DP-SGD steps at ``delta``.

  Each step is the Gaussian mechanism with noise multiplier ``noise_multiplier``
  on a batch Poisson-sampled with rate ``sample_rate``; the composition is
  accounted by ``dp_accounting``'s RDP accountant (``accountant="rdp"``, a
  bound that is slightly loose) or its privacy-loss-distribution accountant
  (``"pld"``, tighter and slower), for adding or removing one example.

  Args:
    noise_multiplier: ``z`` >= 0 (0 gives ``inf``, ``inf`` gives 0).
    sample_rate: each example's probability of being in a batch, in ``(0, 1]``.
    steps: the number of steps, an int >= 0 (0 gives 0).
    delta: in ``(0, 1)``, typically below ``1 / n``.
    accountant: ``"rdp"`` or ``"pld"``.

  Returns:
    epsilon, a float.

  Examples:
    >>> from clipjax import privacy
    >>> round(privacy.epsilon(1.1, 256 / 60000, 10000, 1e-5), 2)
    2.16
    >>> privacy.epsilon(0.0, 0.01, 10, 1e-5)
    inf

  References:
    Mironov, `Rényi Differential Privacy <https://arxiv.org/abs/1702.07476>`_,
    2017; Doroshenko et al., `Connect the Dots: Tighter Discrete Approximations
    of Privacy Loss Distributions <https://arxiv.org/abs/2207.04380>`_, 2022.
  """
  call = "epsilon"
  steps = _check_accounting(call, sample_rate, steps, delta, accountant)
  check_bound(call, "noise_multiplier", noise_multiplier, allow_inf=True)
  dp = _dp_accounting(call)
  z = float(noise_multiplier)
  if steps == 0 or z == math.inf:
    return 0.0
  if z == 0.0:
    return math.inf
  event = _event(dp, z, sample_rate, steps)
  return float(_new_accountant(dp, accountant).compose(event).get_epsilon(delta))


def noise_multiplier_for(
  epsilon: float,
  sample_rate: float,
  steps: int,
  delta: float,
  *,
  accountant: Accountant = "rdp",
  tol: float = 1e-6,
) -> float:
  """The smallest noise multiplier whose ``steps`` steps are ``epsilon``-DP.

  The inverse of :func:`epsilon` in its first argument: the returned ``z``
  satisfies ``epsilon(z, sample_rate, steps, delta) <= epsilon`` and lies
  within ``tol`` (absolute) of the exact smallest such ``z``. It is found by
  ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, bisection as the
  fallback), which evaluates the accountant some 10 to 20 times; ``"pld"``
  takes seconds to minutes where ``"rdp"`` takes well under a second.

  Args:
    epsilon: the target, > 0 (``inf`` gives 0).
    sample_rate: as in :func:`epsilon`.
    steps: as in :func:`epsilon` (0 gives 0).
    delta: as in :func:`epsilon`.
    accountant: ``"rdp"`` or ``"pld"``.
    tol: the tolerance on the noise multiplier (> 0).

  Returns:
    The noise multiplier, a float.

  Examples:
    >>> from clipjax import privacy
    >>> z = privacy.noise_multiplier_for(2.0, 256 / 60000, 10000, 1e-5)
    >>> round(z, 3), privacy.epsilon(z, 256 / 60000, 10000, 1e-5) <= 2.0
    (1.152, True)
  """
  call = "noise_multiplier_for"
  steps = _check_accounting(call, sample_rate, steps, delta, accountant)
  check_bound(call, "epsilon", epsilon, positive=True, allow_inf=True)
  check_bound(call, "tol", tol, positive=True)
  dp = _dp_accounting(call)
  if steps == 0 or float(epsilon) == math.inf:
    return 0.0
  z = dp.calibrate_dp_mechanism(
    lambda: _new_accountant(dp, accountant),
    lambda z: _event(dp, z, sample_rate, steps),
    float(epsilon),
    float(delta),
    dp.LowerEndpointAndGuess(0.0, 1.0),
    tol=float(tol),
  )
  return float(z)


# --- Adaptive clipping --------------------------------------------------------------


class AdaptiveClipState(NamedTuple):
  """The clip bound of noised quantile clipping and the key of the count noise.

  Examples:
    >>> import jax
    >>> from clipjax import privacy
    >>> privacy.adaptive_clip_init(1.0, jax.random.key(0)).clip
    Array(1., dtype=float32)
  """

  clip: jax.Array  # shape=(), float32: the bound to clip the next batch to
  key: jax.Array  # a typed key or a raw uint32 key, as given; split every update


def adaptive_clip_init(
  initial_clip: jax.typing.ArrayLike, key: jax.Array
) -> AdaptiveClipState:
  """The state of noised quantile clipping: the first bound and a key.

  Args:
    initial_clip: the first bound (> 0). The geometric update moves it by a
      factor of at most ``exp(learning_rate)`` a step, so a poor guess costs a
      few dozen steps.
    key: the PRNG key of the noise added to the unclipped count, from
      ``jax.random.key`` or ``jax.random.PRNGKey``; use a key different from
      that of the gradient noise.

  Returns:
    An :class:`AdaptiveClipState`.

  Examples:
    >>> import jax
    >>> from clipjax import privacy
    >>> state = privacy.adaptive_clip_init(0.5, jax.random.key(1))
    >>> print(state.clip, state.clip.dtype)
    0.5 float32
    >>> privacy.adaptive_clip_init(0.0, jax.random.key(1))
    Traceback (most recent call last):
    ...
    ValueError: adaptive_clip_init(initial_clip=0.0) must be a finite positive number.

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, 2021.
  """
  call = "adaptive_clip_init"
  check_bound(call, "initial_clip", initial_clip, positive=True)
  _check_key(call, key)
  return AdaptiveClipState(jnp.asarray(initial_clip, jnp.float32), key)


def adaptive_clip_update(
  state: AdaptiveClipState,
  norms: jax.typing.ArrayLike,
  *,
  target_quantile: jax.typing.ArrayLike = 0.5,
  learning_rate: jax.typing.ArrayLike = 0.2,
  count_stddev: jax.typing.ArrayLike,
  geometric: bool = True,
  batch_size: jax.typing.ArrayLike | None = None,
) -> AdaptiveClipState:
  """Moves the clip bound towards the ``target_quantile`` of the per-example norms.

  With ``C = state.clip`` the bound this batch was clipped to, ``norms`` the
  batch's per-example norms before clipping and ``B`` the (expected) batch
  size, the noised fraction of unclipped examples is
  ``b = clip((sum_i (1[norm_i <= C] - 1/2) + N(0, count_stddev^2)) / B + 1/2,
  0, 1)``, which is ``(sum_i 1[norm_i <= C] + noise) / B`` when ``B`` is the
  batch's own size (centring each indicator at zero halves the sum's
  sensitivity, to 1/2). Then ``C <- C * exp(-learning_rate * (b -
  target_quantile))`` (``geometric``), or ``C <- max(0, C - learning_rate * (b
  - target_quantile))``. A norm that is NaN or infinite counts as clipped.

  With DP-SGD at noise multiplier ``z``, give the gradient sum the noise
  multiplier ``z_delta = adjusted_noise_multiplier(z, count_stddev)``: the two
  noised releases of a step are then together as private as one Gaussian
  mechanism with noise multiplier ``z``, and :func:`epsilon` with ``z``
  accounts for them. Each step clips to the current ``state.clip``, passed as
  a traced ``l2_clip`` to ``clipjax.per_example_clipped_grad``, and noises
  with ``dp_sgd`` rebuilt with that clip (its state does not depend on it; or
  use ``optax.inject_hyperparams(dp_sgd, static_args=("key", "batch_size",
  "momentum", "nesterov"))`` and set ``hyperparams["l2_clip"]``); the second
  example below is a whole loop.

  Args:
    state: the state whose ``clip`` the batch was clipped to.
    norms: the per-example norms before clipping, shape ``(B,)``.
    target_quantile: the fraction of examples to leave unclipped, in
      ``[0, 1]``; the paper finds 0.5 a good default.
    learning_rate: the step size (>= 0); 0.2 is the paper's choice for the
      geometric update.
    count_stddev: ``sigma_b``, the stddev of the noise on the count (>= 0); the
      paper suggests ``B / 20``.
    geometric: the geometric update (the paper's choice) or the linear one.
    batch_size: the expected batch size under Poisson sampling, the
      denominator; by default ``norms``'s length.

  Returns:
    The new :class:`AdaptiveClipState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from clipjax import privacy
    >>> state = privacy.adaptive_clip_init(1.0, jax.random.key(0))
    >>> norms = jnp.array([0.5, 2.0, 3.0, jnp.nan])  # 1 of 4 unclipped
    >>> state = privacy.adaptive_clip_update(state, norms, count_stddev=0.0)
    >>> state.clip  # exp(-0.2 * (0.25 - 0.5))
    Array(1.0512711, dtype=float32)

    DP-SGD with adaptive clipping, on a linear regression:

    >>> import optax, clipjax
    >>> def loss_fn(w, x, y):  # per-example losses, shape (B,)
    ...   return (x @ w - y) ** 2
    >>> B, z, sigma_b = 100, 1.0, 100 / 20
    >>> z_delta = privacy.adjusted_noise_multiplier(z, sigma_b)
    >>> k_noise, k_clip, k_data = jax.random.split(jax.random.key(0), 3)
    >>> x = jax.random.normal(k_data, (B, 3))
    >>> y = x @ jnp.array([1.0, -2.0, 0.5])
    >>> w = jnp.zeros(3)
    >>> opt_state = privacy.dp_sgd(0.1, 1.0, z_delta, k_noise, batch_size=B).init(w)
    >>> clip = privacy.adaptive_clip_init(0.1, k_clip)
    >>> @jax.jit
    ... def step(w, opt_state, clip):
    ...   f = clipjax.per_example_clipped_grad(loss_fn, l2_clip=clip.clip)
    ...   grads, norms = f(w, x, y)
    ...   tx = privacy.dp_sgd(0.1, clip.clip, z_delta, k_noise, batch_size=B)
    ...   updates, opt_state = tx.update(grads, opt_state, w)
    ...   clip = privacy.adaptive_clip_update(clip, norms, count_stddev=sigma_b)
    ...   return optax.apply_updates(w, updates), opt_state, clip
    >>> for _ in range(100):
    ...   w, opt_state, clip = step(w, opt_state, clip)
    >>> print(jnp.round(w, 1))  # epsilon(z, 1.0, 100, 1e-5) bounds the whole loop
    [ 1.  -2.   0.5]

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, 2021.
  """
  call = "adaptive_clip_update"
  _check_interval(call, "target_quantile", target_quantile, 0.0, 1.0, "both")
  check_bound(call, "learning_rate", learning_rate)
  check_bound(call, "count_stddev", count_stddev)
  if batch_size is not None:
    check_bound(call, "batch_size", batch_size, positive=True)
  norms = jnp.asarray(norms)
  if norms.ndim != 1:
    raise ValueError(f"{call}: norms must have shape (B,), got {norms.shape}.")
  if batch_size is None:
    if norms.shape[0] == 0:
      raise ValueError(f"{call}: norms is empty; give the expected batch_size.")
    batch_size = norms.shape[0]
  acc = _norms.accumulation_dtype(norms.dtype)
  next_key, draw_key = jax.random.split(state.key)
  clip = state.clip.astype(jnp.float32)
  unclipped = jnp.isfinite(norms) & (norms.astype(acc) <= clip.astype(acc))
  centred = jnp.sum(unclipped.astype(jnp.float32) - 0.5)
  noise = jax.random.normal(draw_key, (), jnp.float32) * jnp.asarray(
    count_stddev, jnp.float32
  )
  fraction = (centred + noise) / jnp.asarray(batch_size, jnp.float32) + 0.5
  fraction = jnp.clip(fraction, 0.0, 1.0)
  step = jnp.asarray(learning_rate, jnp.float32) * (
    fraction - jnp.asarray(target_quantile, jnp.float32)
  )
  new_clip = clip * jnp.exp(-step) if geometric else jnp.maximum(clip - step, 0.0)
  return AdaptiveClipState(new_clip, next_key)


def adjusted_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
  """The gradient's noise multiplier that leaves room for the noised count.

  Theorem 1 of Andrew et al.: the noised sum of clipped gradients (noise
  multiplier ``z_delta``) and the noised count of :func:`adaptive_clip_update`
  (stddev ``sigma_b``, sensitivity 1/2) are together as private as one Gaussian
  mechanism with noise multiplier ``z`` where ``z^-2 = z_delta^-2 + (2
  sigma_b)^-2``. So for a budget ``z`` the gradient gets ``z_delta = (z^-2 - (2
  sigma_b)^-2)^(-1/2)``, which exists only if ``2 sigma_b > z``.

  Args:
    noise_multiplier: ``z``, the total budget (>= 0, finite; 0 gives 0).
    count_stddev: ``sigma_b``, the count noise's stddev (>= 0; ``inf`` gives
      ``z``).

  Returns:
    ``z_delta``, a float >= ``z``.

  Raises:
    ValueError: if ``2 * count_stddev <= noise_multiplier``: the count alone
      would spend the whole budget.

  Examples:
    >>> from clipjax import privacy
    >>> round(privacy.adjusted_noise_multiplier(1.0, 2.5), 4)  # (1 - 1/25)^-1/2
    1.0206

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, 2021.
  """
  call = "adjusted_noise_multiplier"
  check_bound(call, "noise_multiplier", noise_multiplier)
  check_bound(call, "count_stddev", count_stddev, allow_inf=True)
  z, sigma_b = float(noise_multiplier), float(count_stddev)
  if z == 0.0:
    return 0.0
  if 2.0 * sigma_b <= z:
    raise ValueError(
      f"{call}(noise_multiplier={noise_multiplier!r}, count_stddev={count_stddev!r}):"
      " 2 * count_stddev must exceed noise_multiplier, else the noised count spends"
      " the whole privacy budget."
    )
  return (z**-2 - (2.0 * sigma_b) ** -2) ** -0.5
