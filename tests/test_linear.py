"""Tests of linear attention (elu + 1 features) and the shared feature-map helper."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention import linear
from helpers import largest_array

# Compile with less optimisation: the tests are bound by compilation.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
BATCH, LENGTH, HEADS, HEAD_DIM, VALUE_DIM, CHUNK = 2, 29, 2, 8, 6, 4
# Row 0: keys 3..6 are padding; row 1: keys 0..4 and 24.. are padding.
MASK = np.ones((BATCH, LENGTH), bool)
MASK[0, 3:7] = False
MASK[1, :5] = MASK[1, 24:] = False


def _qkv(seed, q_len=LENGTH, kv_len=LENGTH, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((BATCH, q_len, HEADS, HEAD_DIM))
  k = rng.standard_normal((BATCH, kv_len, HEADS, HEAD_DIM))
  v = rng.standard_normal((BATCH, kv_len, HEADS, VALUE_DIM))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def quadratic_linear_attention(q, k, v, mask, causal):
  """The oracle: weights phi(Q) phi(K)^T materialised, masked and normalised (Eq. 2)."""
  phi = lambda x: jax.nn.elu(x.astype(jnp.float32)) + 1
  weights = jnp.einsum('bqhd,bkhd->bhqk', phi(q), phi(k))
  visible = jnp.asarray(mask)[:, None, None, :]
  if causal:
    visible = visible & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  weights = jnp.where(visible, weights, 0.0)
  total = weights.sum(-1, keepdims=True)
  weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v.astype(jnp.float32))


@functools.partial(jit, static_argnames=('causal', 'fn'))
def _value_and_grads(q, k, v, mask, causal, fn):
  """fn's output and the gradients of a fixed random projection of it w.r.t. q, k, v."""
  weights = jax.random.normal(jax.random.key(0), q.shape[:3] + (v.shape[-1],))
  loss = lambda q, k, v: jnp.sum(weights * fn(q, k, v, mask, causal).astype(jnp.float32))
  return fn(q, k, v, mask, causal), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _chunked(q, k, v, mask, causal):
  """Linear attention over several chunks, steps and blocks (29 positions, chunks of 4)."""
  return linear.linear_attention(q, k, v, mask, causal, chunk_len=CHUNK, block_len=8,
                                 chunks_per_step=3)


@pytest.mark.parametrize('causal', [False, True])
def test_outputs_and_gradients_equal_the_quadratic_form(causal):
  q, k, v = _qkv(0)
  out, grads = _value_and_grads(q, k, v, MASK, causal, _chunked)
  want, want_grads = _value_and_grads(q, k, v, MASK, causal, quadratic_linear_attention)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  for name, got, expected in zip('qkv', grads, want_grads):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_cross_attention_with_other_key_length():
  q, _, _ = _qkv(1, q_len=11)
  _, k, v = _qkv(2)
  out = jit(_chunked, static_argnames='causal')(q, k, v, MASK, False)
  assert out.shape == (BATCH, 11, HEADS, VALUE_DIM)
  np.testing.assert_allclose(out, quadratic_linear_attention(q, k, v, MASK, False),
                             rtol=1e-5, atol=1e-6)


def test_causal_gradient_from_the_future_is_exactly_zero():
  q, k, v = _qkv(3)
  weights = jax.random.normal(jax.random.key(1), q.shape[:3] + (VALUE_DIM,))

  @jit
  def grads(position):
    def loss(q, k, v):
      seen = jnp.arange(LENGTH)[None, :, None, None] <= position
      return jnp.sum(jnp.where(seen, weights * _chunked(q, k, v, None, True), 0.0))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  # Inside a chunk, at a chunk's end, inside and at the end of a scan step.
  for position in (1, 3, 5, 11):
    grad_q, grad_k, grad_v = grads(position)
    for grad in (grad_q, grad_k, grad_v):
      assert np.all(np.asarray(grad[:, position + 1:]) == 0), position
    # Query 0 sees only key 0 (weight 1), so q and k gradients start at 1.
    assert np.all(np.any(np.asarray(grad_v[:, :position + 1]) != 0, axis=(2, 3))), position
    assert np.all(np.any(np.asarray(grad_q[:, 1:position + 1]) != 0, axis=(2, 3))), position
    assert np.all(np.any(np.asarray(grad_k[:, :position + 1]) != 0, axis=(2, 3))), position


@pytest.mark.parametrize('causal', [False, True])
def test_queries_without_visible_keys_give_zeros_and_finite_gradients(causal):
  q, k, v = _qkv(4)
  mask = MASK.copy()
  mask[0] = False
  out, grads = _value_and_grads(q, k, v, mask, causal, _chunked)
  assert np.all(np.asarray(out[0]) == 0)
  if causal:  # keys 0..4 of row 1 are padding, so its queries 0..4 see none
    assert np.all(np.asarray(out[1, :5]) == 0) and np.all(np.asarray(out[1, 5:]) != 0)
  for grad in grads:
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad[0]) == 0)


def test_bfloat16_close_to_float32():
  q, k, v = _qkv(5, dtype=jnp.bfloat16)
  for causal in (False, True):
    out, grads = _value_and_grads(q, k, v, MASK, causal, _chunked)
    want, want_grads = _value_and_grads(*(x.astype(jnp.float32) for x in (q, k, v)), MASK,
                                        causal, _chunked)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=0.03)
    for got, expected in zip(grads, want_grads):
      assert got.dtype == jnp.bfloat16
      np.testing.assert_allclose(got.astype(jnp.float32), expected, atol=0.05)


def test_pmap_over_devices_matches_one_device():
  assert jax.device_count() == 4
  q, k, v = (jnp.concatenate([x, x[::-1]]) for x in _qkv(6))
  mask = np.concatenate([MASK, MASK[::-1]])
  both = lambda q, k, v, mask: [_chunked(q, k, v, mask, causal) for causal in (False, True)]
  split = lambda x: x.reshape((4, 1) + x.shape[1:])
  sharded = jax.pmap(both)(split(q), split(k), split(v), split(mask))
  for out, want in zip(sharded, jit(both)(q, k, v, mask)):
    np.testing.assert_allclose(out.reshape(want.shape), want, rtol=1e-5, atol=1e-6)


def test_module_matches_function_and_options_only_change_speed():
  q, k, v = _qkv(7)
  for causal in (False, True):
    want = quadratic_linear_attention(q, k, v, MASK, causal)
    for options in ({}, {'chunk_len': 5, 'block_len': 7, 'chunks_per_step': 2}):
      attn = ea.make_attention('linear', **options)
      out = jit(lambda q, k, v: attn(q, k, v, mask=MASK, causal=causal))(q, k, v)
      np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=str(options))


@pytest.mark.parametrize('causal', [False, True])
def test_no_quadratic_array_in_forward_or_backward(causal):
  n = 1024
  q, k, v = (jnp.zeros((1, n, 1, 8)) for _ in range(3))
  grad = jax.grad(lambda q, k, v: jnp.sum(linear.linear_attention(q, k, v, causal=causal)),
                  argnums=(0, 1, 2))
  assert largest_array(jax.make_jaxpr(grad)(q, k, v).jaxpr) < n * n // 16
  # The oracle does hold one, so the check can see it.
  oracle = lambda q, k, v: quadratic_linear_attention(q, k, v, np.ones((1, n), bool), causal)
  assert largest_array(jax.make_jaxpr(oracle)(q, k, v).jaxpr) >= n * n


@pytest.mark.parametrize('options,message', [
    ({'chunk_len': 0}, 'chunk_len must be a positive int'),
    ({'block_len': 2.0}, 'block_len must be a positive int'),
    ({'chunks_per_step': -1}, 'chunks_per_step must be a positive int'),
    ({'num_features': 8}, 'valid options: chunk_len, block_len, chunks_per_step'),
])
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    ea.make_attention('linear', **options)


def test_bad_inputs_raise():
  attn = ea.make_attention('linear')
  q, k, v = _qkv(8)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    attn(q[:, :5], k, v, causal=True)
  with pytest.raises(ValueError, match='mask must have shape'):
    attn(q, k, v, mask=MASK[:, :5])
