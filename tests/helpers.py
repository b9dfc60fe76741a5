"""Helpers that several attention test files share: inputs, oracles and checks."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn.attention import base, full

HEADS, HEAD_DIM = 2, 8
# The tests check values, not speed: skip XLA's slow backend optimisations.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def make_qkv(length, batch=2, dtype=jnp.float32, seed=0):
  """Standard normal q, k, v `[batch, length, HEADS, HEAD_DIM]` (numpy: nothing to compile)."""
  rng = np.random.default_rng(seed)
  shape = (batch, length, HEADS, HEAD_DIM)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))


def random_mask(length, batch=2, seed=1, keep=0.8):
  """A bool `[batch, length]` key mask with about `keep` of the keys real."""
  return jnp.asarray(np.random.default_rng(seed).random((batch, length)) < keep)


def normal_qkv(shape, value_dim, dtype=jnp.float32, seed=0):
  """Standard normal q, k of `shape` `[batch, len, heads, dim]` and v with `value_dim`."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, shape, dtype), jax.random.normal(kk, shape, dtype),
          jax.random.normal(kv, shape[:3] + (value_dim,), dtype))


def relative_error(x, reference):
  """max |x - reference| / max |reference| in float64 (max |x| where the reference is all 0)."""
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  scale = np.abs(reference).max()
  return np.abs(x - reference).max() / (scale if scale > 0 else 1.0)


def with_mask_and_causality(visible, mask, causal):
  """The pattern `visible` `[len, len]` with causality and the padding mask, `[batch, len, len]`."""
  length = visible.shape[0]
  if causal:
    visible = visible & np.tri(length, dtype=bool)
  return jnp.asarray(visible[None] & np.asarray(mask)[:, None, :])


def masked_attention(q, k, v, visible):
  """Exact attention under a bool `[batch, (heads,) q_len, kv_len]` mask: the oracle."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if visible.ndim == 3:
    visible = visible[:, None]
  probs = jax.nn.softmax(jnp.where(visible, scores, base.MASK_VALUE), axis=-1)
  probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def value_and_grads(attention, q, k, v, extras):
  """`attention(q, k, v, extras)` and the gradients w.r.t. q, k, v of a fixed projection of it."""
  cotangent = np.random.default_rng(7).normal(size=q.shape[:3] + v.shape[-1:])

  def loss(q, k, v):
    out = attention(q, k, v, extras)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return (out,) + grads


def assert_same_values_and_grads(attention, oracle, q, k, v, extras=None, rtol=1e-5):
  """`attention` and `oracle`, both `f(q, k, v, extras)`, agree in outputs and gradients."""
  # Masks travel in `extras` as arguments, not as constants XLA would fold.
  both = jit(lambda q, k, v, extras: (value_and_grads(attention, q, k, v, extras),
                                      value_and_grads(oracle, q, k, v, extras)))
  actual, expected = both(q, k, v, extras)
  for a, e in zip(actual, expected):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.all(np.isfinite(a))
    # Relative to the largest reference value; absolute where that is below 1
    # (gradients that are exactly 0 in exact arithmetic).
    error = np.abs(a - e).max() / max(np.abs(e).max(), 1.0)
    assert error <= rtol, f'relative error {error}'
  return actual


def assert_matches_oracle(attention, visibility, length, batch=2, mask_seed=1, rtol=1e-5):
  """`attention(q, k, v, mask)` equals masked exact attention under `visibility(mask)`."""
  q, k, v = make_qkv(length, batch)
  mask = random_mask(length, batch, seed=mask_seed)
  extras = (mask, visibility(mask))
  return assert_same_values_and_grads(
      lambda q, k, v, extras: attention(q, k, v, extras[0]),
      lambda q, k, v, extras: masked_attention(q, k, v, extras[1]), q, k, v, extras, rtol)


def causal_zero_gradient_from_the_future(attention, length=40, position=14):
  """dk, dv of the outputs up to `position` (mid-block): zero after it, not all zero before."""
  q, k, v = make_qkv(length)
  cotangent = jnp.zeros(q.shape).at[:, :position + 1].set(1.0)
  grads = lambda q, k, v: jax.vjp(attention, q, k, v)[1](cotangent)
  _, dk, dv = jit(grads)(q, k, v)
  for g in (dk, dv):
    assert np.all(np.asarray(g[:, position + 1:]) == 0)
    assert np.any(np.asarray(g[:, :position + 1]) != 0)


def padding_changes_nothing(attention, length=45):
  """Outputs of real queries stay put when q, k and v change at padding positions."""
  q, k, v = make_qkv(length)
  mask = random_mask(length, keep=0.6)
  noise = make_qkv(length, seed=3)
  hidden = ~mask[:, :, None, None]
  call = jit(attention)
  want = call(q, k, v, mask)
  got = call(*(jnp.where(hidden, 100 * n, x) for x, n in zip((q, k, v), noise)), mask)
  np.testing.assert_allclose(real(got, mask), real(want, mask), rtol=0, atol=1e-6)


def module_under_pmap_matches_one_device(attention, *extras, length=40):
  """Outputs and grads of `attention(q, k, v, mask, True, *extras)` agree under jit and pmap."""
  # `extras` are per-example arrays `[4, ...]`, split over the devices like q, k, v.
  q, k, v = make_qkv(length, batch=4)
  mask = random_mask(length, batch=4)
  cotangent = make_qkv(length, batch=4, seed=5)[0]

  def value_and_grads_of_module(q, k, v, mask, cotangent, *extras):
    out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, mask, True, *extras), q, k, v)
    return (out,) + pullback(cotangent)

  args = (q, k, v, mask, cotangent) + extras
  one_device = jit(value_and_grads_of_module)(*args)
  devices = jax.local_device_count()
  assert devices == 4
  split = lambda x: x.reshape(devices, -1, *x.shape[1:])
  per_device = jax.pmap(value_and_grads_of_module)(*map(split, args))
  for d, o in zip(per_device, one_device):
    np.testing.assert_allclose(d.reshape(o.shape), o, rtol=0, atol=1e-6)


def gradients_of_sum_of_squares(attention):
  """`(q, k, v) -> d sum(attention(q, k, v)^2) / d(q, k, v)`."""
  return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) ** 2), argnums=(0, 1, 2))


def largest_compiled_array(fn, *args):
  """The most elements of any array in the compiled HLO of `fn(*args)`."""
  hlo = jit(fn).lower(*args).compile().as_text()
  return max(np.prod([int(d) for d in dims.split(',') if d])
             for dims in re.findall(r'[a-z]+\d*\[([\d,]*)\]', hlo))


def assert_no_length_squared_array(fn, *args):
  """No array in the compiled HLO of `fn(q, k, v)` comes near the length x length scores."""
  largest = largest_compiled_array(fn, *args)
  # The scores of all heads would be heads * length**2 elements; the core's
  # block steps hold at most 2**18.
  length = args[0].shape[1]
  assert largest <= length ** 2 // 8, largest


def largest_array(jaxpr):
  """The most elements of any value computed in `jaxpr`, inner jaxprs included."""
  sizes = [0]
  for eqn in jaxpr.eqns:
    sizes += [math.prod(getattr(var.aval, 'shape', ())) for var in eqn.outvars]
    for param in eqn.params.values():
      for inner in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(inner, 'jaxpr', inner)
        if isinstance(inner, jax.extend.core.Jaxpr):
          sizes.append(largest_array(inner))
  return max(sizes)


def assert_bad_inputs_raise(attention, length=10):
  """`attention` rejects q of rank 3, q_len != kv_len and a mask of wrong shape or dtype."""
  q, k, v = make_qkv(length)
  with pytest.raises(ValueError, match='rank 4'):
    attention(q[0], k, v)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    attention(q[:, :length // 2], k, v)
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((2, length - 1), bool))
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((2, length), jnp.int32))


def real(x, mask):
  """`x` `[batch, len, ...]` with the positions that `mask` `[batch, len]` pads set to 0."""
  return np.where(np.asarray(mask)[:, :, None, None], x, 0)


def assert_exact_at_real_positions(attention, q, k, v, mask):
  """`attention(q, k, v, mask, causal)` and dense attention agree at real positions, with grads."""

  def both(q, k, v):
    results = []
    for causal in (False, True):
      for fn in (lambda *a: attention(*a, mask, causal),
                 lambda *a: full.dense_attention(*a, mask, causal)):
        loss = lambda q, k, v: jnp.sum(jnp.where(mask[:, :, None, None], fn(q, k, v), 0) ** 2)
        results.append((fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
    return results

  results = jax.jit(both)(q, k, v)
  for (got, got_grads), (want, want_grads) in (results[:2], results[2:]):
    np.testing.assert_allclose(real(got, mask), real(want, mask), atol=1e-6)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-5)


def causal_zero_gradient_at_every_split(attention, q, k, v, splits):
  """Gradients of the outputs before each split of causal `attention(q, k, v)`: 0 after it."""

  def grads(q, k, v, split):
    before = (jnp.arange(q.shape[1]) < split)[None, :, None, None]
    loss = lambda q, k, v: jnp.sum(jnp.where(before, attention(q, k, v), 0) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  grads = jax.jit(grads)
  for split in splits:
    for g in grads(q, k, v, split):
      assert np.all(np.asarray(g[:, split:]) == 0), split
      assert np.any(np.asarray(g[0, :split]) != 0), split


def padding_changes_no_real_output(call, inputs, other, mask):
  """`call(q, k, v, causal)` at real positions ignores q, k, v at padding; returns the changed."""
  padded = ~mask[:, :, None, None]
  changed = [jnp.where(padded, 10 * o, x) for x, o in zip(inputs, other)]
  for causal in (False, True):
    np.testing.assert_allclose(real(call(*changed, causal), mask),
                               real(call(*inputs, causal), mask), atol=1e-6)
  return changed


def fully_masked_row_gives_zeros_and_finite_gradients(attention, q, k, v, mask):
  """With row 1 of `mask` all padding, `attention(q, k, v, mask, causal)` is 0 there, finite."""
  mask = mask.copy()
  mask[1] = False
  for causal in (False, True):
    call = lambda q, k, v: attention(q, k, v, mask, causal)
    out, grads = jax.value_and_grad(lambda *a: jnp.sum(call(*a) ** 2), argnums=(0, 1, 2))(
        q, k, v)
    assert np.all(np.asarray(call(q, k, v)[1]) == 0) and np.isfinite(out)
    assert all(np.all(np.isfinite(g)) for g in grads)


def pmap_over_four_devices_matches_one_call(attention, q, k, v, mask):
  """`attention(q, k, v, mask)` on a doubled batch, one example per device, equals one call."""
  assert jax.device_count() == 4
  q, k, v = (jnp.concatenate([x, x]) for x in (q, k, v))
  mask = np.concatenate([mask, mask])
  split = lambda x: x.reshape((4, 1) + x.shape[1:])
  got = jax.pmap(attention)(*map(split, (q, k, v, mask)))
  np.testing.assert_allclose(got.reshape((4,) + got.shape[2:]), attention(q, k, v, mask),
                             atol=1e-6)


def bfloat16_close_to_float32(attention, q, k, v, mask):
  """`attention(q, k, v)` on bfloat16 inputs stays bfloat16 and near float32 at real positions."""
  call = jax.jit(attention)
  low = call(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(real(low.astype(jnp.float32), mask), real(call(q, k, v), mask),
                             atol=0.05)
