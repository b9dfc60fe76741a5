"""Tests of the 'local' attention against exact attention with explicit masks."""

import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention.full import dense_attention
from efficient_attn.attention.local import LocalAttention, local_attention
from helpers import (assert_bad_inputs_raise, assert_matches_oracle, assert_no_length_squared_array,
                     assert_same_values_and_grads, causal_zero_gradient_from_the_future,
                     gradients_of_sum_of_squares, jit, make_qkv,
                     module_under_pmap_matches_one_device, padding_changes_nothing, random_mask,
                     with_mask_and_causality)


def local_visibility(length, block_len, look_back, causal, mask):
  """The dense `[batch, len, len]` visibility that local attention stands for."""
  block = np.arange(length) // block_len
  offset = block[:, None] - block[None, :]  # query block minus key block
  visible = (offset == 0) | (look_back & (offset == 1))
  return with_mask_and_causality(visible, mask, causal)


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
  assert_bad_inputs_raise(ea.make_attention('local', block_len=4))
