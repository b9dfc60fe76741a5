"""MultiHeadAttention: projections around any registered attention, Linen interop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import efficient_attn as ea


def make_mha(**kwargs):
  options = dict(num_heads=4, in_features=32, rngs=nnx.Rngs(0))
  options.update(kwargs)
  return ea.MultiHeadAttention(**options)


def test_self_and_cross_attention_shapes():
  mha = make_mha(out_features=24, context_features=12, qkv_features=64)
  x = jnp.ones((2, 10, 32))
  assert mha(x, jnp.ones((2, 7, 12)), mask=jnp.ones((2, 7), bool)).shape == (2, 10, 24)
  assert make_mha()(x).shape == (2, 10, 32)


def test_backends_agree_and_match_a_hand_computation():
  x = jax.random.normal(jax.random.key(0), (2, 50, 32))
  mask = jnp.arange(50)[None] < jnp.array([[50], [31]])
  dense = make_mha(attention_options={'backend': 'dense'})
  blocked = make_mha(attention_options={'backend': 'blocked', 'q_block': 16, 'kv_block': 16})
  got = blocked(x, mask=mask, causal=True)
  np.testing.assert_allclose(got, dense(x, mask=mask, causal=True), rtol=1e-5, atol=1e-5)
  # Same computation written out: project, attend per head, project back.
  q = jnp.einsum('bnf,fhd->bnhd', x, dense.query.kernel[...]) + dense.query.bias[...]
  k = jnp.einsum('bnf,fhd->bnhd', x, dense.key.kernel[...]) + dense.key.bias[...]
  v = jnp.einsum('bnf,fhd->bnhd', x, dense.value.kernel[...]) + dense.value.bias[...]
  y = ea.dense_attention(q, k, v, mask, causal=True)
  want = jnp.einsum('bnhd,hdf->bnf', y, dense.out.kernel[...]) + dense.out.bias[...]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causal_mha_has_no_gradient_from_the_future():
  mha = make_mha()
  x = jax.random.normal(jax.random.key(1), (1, 20, 32))
  dx = jax.grad(lambda x: jnp.sum(mha(x, causal=True)[:, :8]))(x)
  assert np.all(np.asarray(dx[:, 8:]) == 0) and np.any(np.asarray(dx[:, :8]) != 0)


def test_dropout_in_training_only():
  mha = make_mha(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(2), (2, 10, 32))
  assert not np.allclose(mha(x), mha(x))
  mha.eval()
  np.testing.assert_array_equal(mha(x), mha(x))


def test_bfloat16_compute():
  mha = make_mha(dtype=jnp.bfloat16)
  y = mha(jnp.ones((2, 10, 32), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and mha.query.kernel[...].dtype == jnp.float32


def test_usable_from_linen_through_bridge():

  class LinenModel(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nnx.bridge.to_linen(ea.MultiHeadAttention, num_heads=4, in_features=32)(x)

  x = jax.random.normal(jax.random.key(3), (2, 10, 32))
  variables = LinenModel().init(jax.random.key(0), x)
  y = LinenModel().apply(variables, x)
  assert y.shape == (2, 10, 32)
  grads = jax.grad(lambda v: jnp.sum(LinenModel().apply(v, x) ** 2))(variables)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_heads=3), 'qkv_features=32 must be divisible by num_heads=3'),
    (dict(num_heads=0), 'num_heads must be a positive int'),
    (dict(attention='nope'), "unknown attention 'nope'"),
    (dict(attention_options={'windw': 3}), r"unknown option\(s\) \['windw'\]"),
    (dict(dropout_rate=1.0), 'dropout_rate must be in'),
])
def test_bad_construction_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_mha(**kwargs)


def test_bad_call_raises():
  mha = make_mha()
  with pytest.raises(ValueError, match=r'x must have shape \[batch, length, features\]'):
    mha(jnp.ones((10, 32)))
  with pytest.raises(ValueError, match='context must have shape'):
    mha(jnp.ones((2, 10, 32)), jnp.ones((3, 10, 32)))
  with pytest.raises(ValueError, match='mask must have shape'):
    mha(jnp.ones((2, 10, 32)), mask=jnp.ones((2, 11), bool))


def test_shared_qk_lsh_has_no_key_projection_and_refuses_a_context():
  mha = make_mha(attention='lsh', attention_options={'chunk_len': 4})
  assert mha.key is None
  x = jax.random.normal(jax.random.key(4), (1, 16, 32))
  grads = nnx.grad(lambda m: jnp.sum(m(x, deterministic=True) ** 2))(mha)
  # Every parameter gets a gradient: no dead projection.
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match='cannot attend to a context'):
    mha(x, x)
  separate = make_mha(attention='lsh', attention_options={'chunk_len': 4, 'shared_qk': False})
  assert separate.key is not None


def test_dropout_under_plain_jit_with_explicit_rngs():
  mha = make_mha(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(5), (2, 10, 32))
  step = jax.jit(lambda x, key: mha(x, rngs=key))
  np.testing.assert_array_equal(step(x, jax.random.key(1)), step(x, jax.random.key(1)))
  assert not np.allclose(step(x, jax.random.key(1)), step(x, jax.random.key(2)))
  evaluate = jax.jit(lambda x: mha(x, deterministic=True))
  np.testing.assert_allclose(evaluate(x), make_mha(dropout_rate=0.0)(x), atol=1e-6)
