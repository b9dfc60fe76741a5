"""Tests of the 'local' attention against exact attention with explicit masks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention.full import dense_attention
from efficient_attn.attention.local import LocalAttention, local_attention
from test_longformer import (assert_same_values_and_grads, jit, make_qkv, masked_attention,
                             random_mask)


def with_mask_and_causality(visible, mask, causal):
  """The pattern `visible` `[len, len]` with causality and the padding mask, `[batch, len, len]`."""
  length = visible.shape[0]
  if causal:
    visible = visible & np.tri(length, dtype=bool)
  return jnp.asarray(visible[None] & np.asarray(mask)[:, None, :])


def local_visibility(length, block_len, look_back, causal, mask):
  """The dense `[batch, len, len]` visibility that local attention stands for."""
  block = np.arange(length) // block_len
  offset = block[:, None] - block[None, :]  # query block minus key block
  visible = (offset == 0) | (look_back & (offset == 1))
  return with_mask_and_causality(visible, mask, causal)


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
  real = np.asarray(mask)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=0, atol=1e-6)


def module_under_pmap_matches_one_device(attention, length=40):
  """Outputs and gradients of `attention(q, k, v, mask, causal=True)` under jit and pmap agree."""
  q, k, v = make_qkv(length, batch=4)
  mask = random_mask(length, batch=4)
  cotangent = make_qkv(length, batch=4, seed=5)[0]

  def value_and_grads(q, k, v, mask, cotangent):
    out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, mask, True), q, k, v)
    return (out,) + pullback(cotangent)

  args = (q, k, v, mask, cotangent)
  one_device = jit(value_and_grads)(*args)
  devices = jax.local_device_count()
  assert devices == 4
  split = lambda x: x.reshape(devices, -1, *x.shape[1:])
  per_device = jax.pmap(value_and_grads)(*map(split, args))
  for d, o in zip(per_device, one_device):
    np.testing.assert_allclose(d.reshape(o.shape), o, rtol=0, atol=1e-6)


def assert_no_length_squared_array(fn, *args):
  """No array in the compiled HLO of `fn(q, k, v)` comes near the length x length scores."""
  hlo = jit(fn).lower(*args).compile().as_text()
  largest = max(np.prod([int(d) for d in dims.split(',') if d])
                for dims in re.findall(r'[a-z]+\d*\[([\d,]*)\]', hlo))
  # The scores of all heads would be heads * length**2 elements; the core's
  # block steps hold at most 2**18.
  length = args[0].shape[1]
  assert largest <= length ** 2 // 8, largest


def gradients_of_sum_of_squares(attention):
  """`(q, k, v) -> d sum(attention(q, k, v)^2) / d(q, k, v)`."""
  return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) ** 2), argnums=(0, 1, 2))


@pytest.mark.parametrize('causal,padded,look_back', [(False, False, False), (False, True, True),
                                                     (True, True, False)])
def test_block_covering_everything_is_exact_attention(causal, padded, look_back):
  q, k, v = make_qkv(40)
  mask = random_mask(40) if padded else None
  local = lambda q, k, v, mask: local_attention(q, k, v, mask, causal, block_len=64,
                                                look_back=look_back)
  dense = lambda q, k, v, mask: dense_attention(q, k, v, mask, causal)
  assert_same_values_and_grads(local, dense, q, k, v, mask)


@pytest.mark.parametrize('length,block_len,look_back,causal', [
    (37, 8, False, False), (37, 8, True, True), (40, 5, True, False), (33, 4, False, True)])
def test_pattern_matches_dense_oracle(length, block_len, look_back, causal):
  assert_matches_oracle(
      lambda q, k, v, mask: local_attention(q, k, v, mask, causal, block_len, look_back),
      lambda mask: local_visibility(length, block_len, look_back, causal, mask), length)


def test_causality_no_gradient_from_the_future():
  causal_zero_gradient_from_the_future(
      lambda q, k, v: local_attention(q, k, v, None, True, block_len=8, look_back=True))


@pytest.mark.parametrize('look_back', [False, True])
def test_padding_in_q_k_and_v_changes_nothing(look_back):
  padding_changes_nothing(lambda q, k, v, mask: local_attention(
      q, k, v, mask, False, block_len=6, look_back=look_back))


def test_query_with_no_visible_key_gives_zeros_and_finite_gradients():
  length, block_len = 32, 8
  q, k, v = make_qkv(length)
  # Row 0: every key is padding. Row 1: keys 8..15 (one block) are padding.
  mask = jnp.ones((2, length), bool).at[0].set(False).at[1, 8:16].set(False)
  attention = lambda q, k, v: local_attention(q, k, v, mask, False, block_len)
  out, (dq, dk, dv) = jit(lambda q, k, v: (attention(q, k, v), gradients_of_sum_of_squares(
      attention)(q, k, v)))(q, k, v)
  for x in (out, dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(dq[0]) == 0)
  assert np.all(np.asarray(out[1, 8:16]) == 0) and np.all(np.asarray(out[1, :8]) != 0)


def test_bfloat16_inputs():
  length, block_len = 40, 8
  results = assert_matches_oracle(
      lambda q, k, v, mask: local_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                            v.astype(jnp.bfloat16), mask, True, block_len, True),
      lambda mask: local_visibility(length, block_len, True, True, mask), length, rtol=2e-2)
  assert results[0].dtype == jnp.bfloat16


def test_module_under_jit_and_pmap_matches_one_device():
  module_under_pmap_matches_one_device(ea.make_attention('local', block_len=8, look_back=True))


def test_no_length_squared_array_forward_or_backward():
  length = 2048
  q, k, v = make_qkv(length, batch=1)
  grads = gradients_of_sum_of_squares(
      lambda q, k, v: local_attention(q, k, v, None, True, block_len=16, look_back=True))
  assert_no_length_squared_array(grads, q, k, v)


def test_registered_with_its_options():
  assert ea.attention_class('local') is LocalAttention
  assert LocalAttention.options == ('block_len', 'look_back')
  attention = ea.make_attention('local')
  assert (attention.block_len, attention.look_back) == (50, False)  # LRA's defaults
  q, k, v = make_qkv(20)
  out = jit(attention)(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize('option,value', [
    ('block_len', 0), ('block_len', -1), ('block_len', 2.5), ('block_len', True),
    ('look_back', 1), ('look_back', 'yes')])
def test_bad_options_name_the_argument(option, value):
  with pytest.raises(ValueError, match=option):
    ea.make_attention('local', **{option: value})


def test_unknown_option_lists_valid_ones():
  with pytest.raises(ValueError, match='block_len'):
    ea.make_attention('local', window=4)


def test_bad_inputs():
  attention = ea.make_attention('local', block_len=4)
  q, k, v = make_qkv(10)
  with pytest.raises(ValueError, match='rank 4'):
    attention(q[0], k, v)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    attention(q[:, :5], k, v)
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((2, 9), bool))
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((2, 10), jnp.int32))
