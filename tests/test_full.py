"""Exact attention: blocked and xla backends against the dense oracle, masks, causality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.attention.full import dense_attention, xla_attention
from helpers import relative_error

BLOCKS = dict(q_block=64, kv_block=32)  # small blocks so short inputs span several


def random_qkv(seed, batch, q_len, kv_len, heads=2, head_dim=16, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, heads, head_dim), dtype)
  return q, k, v


def random_mask(seed, batch, kv_len):
  return jax.random.bernoulli(jax.random.key(seed + 100), 0.7, (batch, kv_len))


@functools.partial(jax.jit, static_argnums=(0, 5))
def outputs_and_grads(fn, q, k, v, mask, causal):
  """fn's output and the gradients of a random projection of it w.r.t. q, k, v (one program)."""
  probe = jax.random.normal(jax.random.key(7), q.shape[:3] + v.shape[-1:], jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask, causal).astype(jnp.float32) * probe)
  return fn(q, k, v, mask, causal), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


BACKENDS = {
    'blocked': lambda q, k, v, mask, causal: ea.blocked_attention(q, k, v, mask, causal, **BLOCKS),
    'xla': xla_attention,
}


# (q_len, kv_len, masked, causal): lengths that are not block multiples, cross-attention.
FLOAT32_CASES = [(17, 17, False, False), (17, 17, False, True)]
FLOAT32_CASES += [(1, 1, True, True), (1000, 1000, True, False), (1537, 1537, True, True),
                  (33, 150, True, True), (150, 33, True, False)]


@pytest.mark.parametrize('backend', ['blocked', 'xla'])
@pytest.mark.parametrize('q_len,kv_len,masked,causal', FLOAT32_CASES)
def test_matches_dense_float32(backend, q_len, kv_len, masked, causal):
  q, k, v = random_qkv(q_len + kv_len, 2 if q_len < 1000 else 1, q_len, kv_len)
  mask = random_mask(q_len, q.shape[0], kv_len) if masked else None
  want, want_grads = outputs_and_grads(dense_attention, q, k, v, mask, causal)
  got, got_grads = outputs_and_grads(BACKENDS[backend], q, k, v, mask, causal)
  assert got.shape == want.shape and got.dtype == q.dtype
  assert relative_error(got, want) < 1e-5
  for name, g, w in zip('qkv', got_grads, want_grads):
    assert relative_error(g, w) < 1e-5, name


def test_default_backend_and_blocks_match_dense():
  # On CPU the default backend ('auto') is the blocked kernel with its default blocks.
  q, k, v = random_qkv(5, 1, 1100, 1100)
  want = dense_attention(q, k, v, causal=True)
  assert relative_error(ea.make_attention('full')(q, k, v, causal=True), want) < 1e-5


@pytest.mark.parametrize('backend', ['blocked', 'xla'])
@pytest.mark.parametrize('causal', [False, True])
def test_matches_dense_bfloat16(backend, causal):
  q, k, v = random_qkv(3, 2, 300, 300, dtype=jnp.bfloat16)
  mask = random_mask(3, 2, 300)
  # The oracle sees the same bfloat16 values, computed in float32.
  f32 = lambda x: x.astype(jnp.float32)
  want, want_grads = outputs_and_grads(dense_attention, f32(q), f32(k), f32(v), mask, causal)
  got, got_grads = outputs_and_grads(BACKENDS[backend], q, k, v, mask, causal)
  assert got.dtype == jnp.bfloat16
  assert relative_error(got, want) < 2e-2
  for name, g, w in zip('qkv', got_grads, want_grads):
    assert g.dtype == jnp.bfloat16
    assert relative_error(g, w) < 2e-2, name


@pytest.mark.parametrize('backend', ['dense', 'blocked', 'xla'])
def test_query_without_visible_key_gives_zeros(backend):
  q, k, v = random_qkv(0, 2, 40, 40)
  mask = jnp.ones((2, 40), bool).at[1].set(False)  # second example: all keys padding
  fn = lambda q, k, v, mask, causal: ea.make_attention(
      'full', backend=backend, **(BLOCKS if backend == 'blocked' else {}))(q, k, v, mask, causal)
  out, grads = outputs_and_grads(fn, q, k, v, mask, False)
  assert np.all(np.asarray(out[1]) == 0)
  assert np.all(np.isfinite(out))
  for g in grads:
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g[1]) == 0)


@pytest.mark.parametrize('backend', ['dense', 'blocked', 'xla'])
def test_causal_has_no_gradient_from_the_future(backend):
  attn = ea.make_attention('full', backend=backend, **(BLOCKS if backend == 'blocked' else {}))
  q, k, v = random_qkv(1, 1, 150, 150)
  for i in (0, 40, 149):
    loss = lambda k, v: jnp.sum(attn(q, k, v, causal=True)[:, :i + 1])
    dk, dv = jax.grad(loss, argnums=(0, 1))(k, v)
    assert np.all(np.asarray(dk[:, i + 1:]) == 0) and np.all(np.asarray(dv[:, i + 1:]) == 0)
    assert np.any(np.asarray(dv[:, :i + 1]) != 0)


@pytest.mark.parametrize('backend', ['dense', 'blocked', 'xla'])
@pytest.mark.parametrize('causal', [False, True])
def test_padding_invariance(backend, causal):
  attn = ea.make_attention('full', backend=backend, **(BLOCKS if backend == 'blocked' else {}))
  q, k, v = random_qkv(2, 2, 130, 130)
  mask = random_mask(2, 2, 130)
  noise_k, noise_v = random_qkv(9, 2, 130, 130)[1:]
  hidden = ~mask[:, :, None, None]
  k2 = jnp.where(hidden, 100 * noise_k, k)
  v2 = jnp.where(hidden, 100 * noise_v, v)
  np.testing.assert_array_equal(attn(q, k, v, mask, causal), attn(q, k2, v2, mask, causal))


def test_jit_grad_pmap_and_sharding_agree_with_one_device():
  assert jax.device_count() == 4, 'tests/conftest.py must force 4 host devices'
  attn = ea.make_attention('full', backend='blocked', **BLOCKS)
  q, k, v = random_qkv(4, 4, 100, 100)
  mask = random_mask(4, 4, 100)
  want = attn(q, k, v, mask, True)

  jitted = jax.jit(lambda q, k, v, m: attn(q, k, v, m, True))(q, k, v, mask)
  np.testing.assert_allclose(jitted, want, rtol=1e-6, atol=1e-6)

  pmapped = jax.pmap(lambda q, k, v, m: attn(q[None], k[None], v[None], m[None], True)[0])(
      q, k, v, mask)
  np.testing.assert_allclose(pmapped, want, rtol=1e-6, atol=1e-6)

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  args = jax.device_put((q, k, v, mask), batch_sharded)
  sharded = jax.jit(lambda q, k, v, m: attn(q, k, v, m, True))(*args)
  assert len(sharded.sharding.device_set) == 4
  np.testing.assert_allclose(sharded, want, rtol=1e-6, atol=1e-6)

  grad_fn = jax.grad(lambda q: jnp.sum(attn(q, k, v, mask, True) ** 2))
  np.testing.assert_allclose(jax.jit(grad_fn)(q), grad_fn(q), rtol=1e-5, atol=1e-6)
  sharded_grad = jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(attn(q, k, v, m, True) ** 2)))(*args)
  np.testing.assert_allclose(sharded_grad, grad_fn(q), rtol=1e-5, atol=1e-6)


def test_registry_and_options():
  assert 'full' in ea.available_attentions()
  assert isinstance(ea.make_attention('full', rngs=nnx.Rngs(0)), ea.Attention)
  with pytest.raises(ValueError, match=r"unknown attention 'nope'; available: full"):
    ea.make_attention('nope')
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['window'\].*backend"):
    ea.make_attention('full', window=3)
  with pytest.raises(ValueError, match=r"backend='fast'.*'dense', 'blocked', 'xla', 'cudnn', 'auto'"):
    ea.make_attention('full', backend='fast')
  with pytest.raises(ValueError, match='q_block must be a positive int, got 0'):
    ea.make_attention('full', q_block=0)


@pytest.mark.parametrize('args,message', [
    (dict(q=jnp.ones((2, 5, 16))), r'q must have rank 4.*\(2, 5, 16\)'),
    (dict(k=jnp.ones((2, 5, 3, 16)), v=jnp.ones((2, 5, 3, 16))),
     r'q and k must agree.*\(2, 5, 2, 16\).*\(2, 5, 3, 16\)'),
    (dict(v=jnp.ones((2, 6, 2, 16))), r'k and v must agree.*\(2, 6, 2, 16\)'),
    (dict(k=jnp.ones((2, 5, 2, 8)), v=jnp.ones((2, 5, 2, 8))), r'q and k must agree'),
    (dict(k=jnp.ones((3, 5, 2, 16)), v=jnp.ones((3, 5, 2, 16))), r'q and k must agree'),
    (dict(q=jnp.ones((2, 5, 2, 16), jnp.int32)), r'q must be a floating dtype, got int32'),
    (dict(v=jnp.ones((2, 5, 2, 16), jnp.bfloat16)), r'one dtype'),
    (dict(mask=jnp.ones((2, 5))), r'mask must be a bool array.*float32'),
    (dict(mask=jnp.ones((2, 6), bool)), r'mask must have shape \[batch, kv_len\] = \(2, 5\), got \(2, 6\)'),
    (dict(mask=jnp.ones((5,), bool)), r'mask must have shape'),
])
def test_bad_inputs_raise(args, message):
  inputs = dict(q=jnp.ones((2, 5, 2, 16)), k=jnp.ones((2, 5, 2, 16)), v=jnp.ones((2, 5, 2, 16)),
                mask=None)
  inputs.update(args)
  with pytest.raises(ValueError, match=message):
    ea.make_attention('full')(**inputs)
