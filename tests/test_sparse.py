"""Tests of the 'sparse' attention against exact attention with explicit masks."""

import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention.full import dense_attention
from efficient_attn.attention.sparse import SparseAttention, sparse_attention
from helpers import (assert_bad_inputs_raise, assert_matches_oracle, assert_no_length_squared_array,
                     assert_same_values_and_grads, causal_zero_gradient_from_the_future,
                     gradients_of_sum_of_squares, jit, make_qkv,
                     module_under_pmap_matches_one_device, padding_changes_nothing, random_mask,
                     with_mask_and_causality)


def small(pattern, block_len=6):
  """Options of `pattern` for short tests: blocks of 6, 2 summary keys for 'fixed'."""
  return {'pattern': pattern, 'block_len': block_len,
          'summary_len': 2 if pattern == 'fixed' else None}


def sparse_visibility(length, pattern, block_len, summary_len, causal, mask):
  """The dense `[batch, len, len]` visibility of Child et al.'s patterns (their Figure 3)."""
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  if pattern == 'strided':
    visible = (np.abs(i - j) <= block_len) | ((i - j) % block_len == 0)
  else:
    visible = (i // block_len == j // block_len) | (j % block_len >= block_len - summary_len)
  return with_mask_and_causality(visible, mask, causal)


@pytest.mark.parametrize('pattern,block_len,summary_len,causal', [
    ('strided', 64, None, False), ('strided', 40, None, True), ('fixed', 8, 8, False),
    ('fixed', 64, 3, True)])
def test_pattern_covering_everything_is_exact_attention(pattern, block_len, summary_len, causal):
  # strided: block_len >= len; fixed: every key is a summary key or the block is everything.
  q, k, v = make_qkv(40)
  mask = random_mask(40)
  sparse = lambda q, k, v, mask: sparse_attention(q, k, v, mask, causal, pattern, block_len,
                                                  summary_len)
  dense = lambda q, k, v, mask: dense_attention(q, k, v, mask, causal)
  assert_same_values_and_grads(sparse, dense, q, k, v, mask)


@pytest.mark.parametrize('length,pattern,block_len,summary_len,causal', [
    (37, 'strided', 5, None, False), (45, 'strided', 4, None, True),
    (30, 'strided', 1, None, False),
    (37, 'fixed', 8, 2, False), (45, 'fixed', 6, 1, True), (40, 'fixed', 5, 3, False)])
def test_pattern_matches_dense_oracle(length, pattern, block_len, summary_len, causal):
  assert_matches_oracle(
      lambda q, k, v, mask: sparse_attention(q, k, v, mask, causal, pattern, block_len,
                                             summary_len),
      lambda mask: sparse_visibility(length, pattern, block_len, summary_len, causal, mask),
      length)


@pytest.mark.parametrize('pattern', ['strided', 'fixed'])
def test_causality_no_gradient_from_the_future(pattern):
  causal_zero_gradient_from_the_future(
      lambda q, k, v: sparse_attention(q, k, v, None, True, **small(pattern)))


@pytest.mark.parametrize('pattern', ['strided', 'fixed'])
def test_padding_in_q_k_and_v_changes_nothing(pattern):
  padding_changes_nothing(lambda q, k, v, mask: sparse_attention(
      q, k, v, mask, False, **small(pattern)))


@pytest.mark.parametrize('pattern', ['strided', 'fixed'])
def test_query_with_no_visible_key_gives_zeros_and_finite_gradients(pattern):
  length = 32
  q, k, v = make_qkv(length)
  # Row 0: every key is padding. Row 1: only keys 0..3 are real, so causal
  # queries see them and nothing else.
  mask = jnp.zeros((2, length), bool).at[1, :4].set(True)
  attention = lambda q, k, v: sparse_attention(q, k, v, mask, True, **small(pattern, 8))
  out, (dq, dk, dv) = jit(lambda q, k, v: (attention(q, k, v), gradients_of_sum_of_squares(
      attention)(q, k, v)))(q, k, v)
  for x in (out, dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(dq[0]) == 0)
  assert np.all(np.asarray(out[1, :4]) != 0)


@pytest.mark.parametrize('pattern,causal', [('strided', False), ('fixed', True)])
def test_bfloat16_inputs(pattern, causal):
  length = 40
  results = assert_matches_oracle(
      lambda q, k, v, mask: sparse_attention(
          q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, causal,
          **small(pattern)),
      lambda mask: sparse_visibility(length, causal=causal, mask=mask, **small(pattern)), length,
      rtol=2e-2)
  assert results[0].dtype == jnp.bfloat16


@pytest.mark.parametrize('pattern', ['strided', 'fixed'])
def test_module_under_jit_and_pmap_matches_one_device(pattern):
  module_under_pmap_matches_one_device(
      ea.make_attention('sparse', **small(pattern)))


@pytest.mark.parametrize('pattern', ['strided', 'fixed'])
def test_no_length_squared_array_forward_or_backward(pattern):
  length = 2048
  q, k, v = make_qkv(length, batch=1)
  grads = gradients_of_sum_of_squares(
      lambda q, k, v: sparse_attention(q, k, v, None, False, **small(pattern, 64)))
  assert_no_length_squared_array(grads, q, k, v)


def test_registered_with_its_options():
  assert ea.attention_class('sparse') is SparseAttention
  assert SparseAttention.options == ('pattern', 'block_len', 'summary_len')
  attention = ea.make_attention('sparse')
  # LRA's default, the paper's EnWik8 setting.
  assert (attention.pattern, attention.block_len, attention.summary_len) == ('fixed', 128, 32)
  q, k, v = make_qkv(20)
  out = jit(attention)(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize('option,value', [
    ('pattern', 'dense'), ('pattern', None), ('block_len', 0), ('block_len', 2.5),
    ('block_len', True), ('summary_len', 0), ('summary_len', -1), ('summary_len', '2')])
def test_bad_options_name_the_argument(option, value):
  with pytest.raises(ValueError, match=option):
    ea.make_attention('sparse', **{option: value})


def test_summary_len_default_and_its_errors():
  assert ea.make_attention('sparse', block_len=16).summary_len == 4
  assert ea.make_attention('sparse', block_len=2).summary_len == 1
  assert ea.make_attention('sparse', pattern='strided', block_len=16).summary_len is None
  with pytest.raises(ValueError, match='summary_len must be at most block_len.*9.*8'):
    ea.make_attention('sparse', block_len=8, summary_len=9)
  with pytest.raises(ValueError, match="summary_len applies to pattern='fixed' only, got 2"):
    ea.make_attention('sparse', pattern='strided', summary_len=2)


def test_bad_pattern_of_the_function_raises():
  with pytest.raises(ValueError, match="pattern='dense' is not supported; allowed: 'strided'"):
    sparse_attention(*make_qkv(8), pattern='dense')


def test_unknown_option_lists_valid_ones():
  with pytest.raises(ValueError, match='summary_len'):
    ea.make_attention('sparse', stride=4)


def test_bad_inputs():
  assert_bad_inputs_raise(ea.make_attention('sparse', block_len=4, summary_len=1))
