"""Tests of the 'longformer' attention against exact attention with explicit masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention.full import dense_attention
from efficient_attn.attention.longformer import LongformerAttention, sliding_window_attention
from helpers import (assert_bad_inputs_raise, assert_same_values_and_grads, jit,
                     largest_compiled_array, make_qkv, masked_attention,
                     module_under_pmap_matches_one_device, random_mask)


def random_global(length, batch=2, count=3, seed=2):
  """A bool `[batch, len]` with `count` global tokens per row."""
  out = np.zeros((batch, length), bool)
  for b in range(batch):
    out[b, np.random.default_rng(seed + b).choice(length, count, replace=False)] = True
  return jnp.asarray(out)


def dense_visibility(length, window, dilation=1, causal=False, mask=None, global_mask=None,
                     batch=2):
  """The dense `[batch, len, len]` visibility that longformer attention stands for."""
  offset = np.arange(length)[None, :] - np.arange(length)[:, None]  # key minus query
  visible = (offset % dilation == 0) & (np.abs(offset) <= dilation * window)
  if causal:
    visible &= offset <= 0
  visible = np.broadcast_to(visible, (batch, length, length))
  if global_mask is not None:
    g = np.asarray(global_mask)
    visible = visible | g[:, :, None] | g[:, None, :]
    if causal:
      visible = visible & (offset <= 0)
  if mask is not None:
    visible = visible & np.asarray(mask)[:, None, :]
  return jnp.asarray(visible)


@pytest.mark.parametrize('causal,padded', [(False, False), (False, True), (True, False),
                                           (True, True)])
def test_window_covering_everything_is_exact_attention(causal, padded):
  q, k, v = make_qkv(40)
  mask = random_mask(40) if padded else None
  longformer = lambda q, k, v, mask: sliding_window_attention(q, k, v, mask, causal, window=64)
  dense = lambda q, k, v, mask: dense_attention(q, k, v, mask, causal)
  assert_same_values_and_grads(longformer, dense, q, k, v, mask)


@pytest.mark.parametrize('length,window,block,causal', [(17, 3, None, True), (100, 20, 8, False),
                                                        (100, 20, 8, True)])
def test_window_matches_jax_local_window(length, window, block, causal):
  # jax: query i sees keys j with i - left <= j <= i + right.
  q, k, v = make_qkv(length)
  longformer = lambda q, k, v, _: sliding_window_attention(q, k, v, None, causal, window,
                                                           block=block)
  local = lambda q, k, v, _: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, local_window_size=(window, 0 if causal else window))
  assert_same_values_and_grads(longformer, local, q, k, v)


@pytest.mark.parametrize('dilation,causal,max_global', [(1, False, 5), (3, True, 3)])
def test_global_tokens_match_dense_oracle(dilation, causal, max_global):
  length, window = 60, 4
  q, k, v = make_qkv(length)
  mask = random_mask(length)
  global_mask = random_global(length).at[0, 0].set(True).at[1, length - 1].set(True)
  # Under jit only the first max_global global tokens of a row are global.
  first_global = global_mask & (jnp.cumsum(global_mask, axis=1) <= max_global)
  extras = (mask, global_mask, dense_visibility(length, window, dilation, causal, mask,
                                                first_global))
  longformer = lambda q, k, v, extras: sliding_window_attention(
      q, k, v, extras[0], causal, window, dilation, extras[1], max_global, block=8)
  oracle = lambda q, k, v, extras: masked_attention(q, k, v, extras[2])
  assert_same_values_and_grads(longformer, oracle, q, k, v, extras)


@pytest.mark.parametrize('length,window,dilation,causal', [(101, 5, 4, False), (50, 3, 2, True)])
def test_dilation_matches_dense_oracle(length, window, dilation, causal):
  q, k, v = make_qkv(length)
  mask = random_mask(length)
  extras = (mask, dense_visibility(length, window, dilation, causal, mask))
  longformer = lambda q, k, v, extras: sliding_window_attention(q, k, v, extras[0], causal,
                                                                window, dilation)
  oracle = lambda q, k, v, extras: masked_attention(q, k, v, extras[1])
  assert_same_values_and_grads(longformer, oracle, q, k, v, extras)


@pytest.mark.parametrize('length', [1, 17, 1000])
def test_lengths_that_are_not_block_multiples(length):
  window = 12
  q, k, v = make_qkv(length, batch=1)
  mask = random_mask(length, batch=1).at[0, 0].set(True)
  extras = (mask, dense_visibility(length, window, mask=mask, batch=1))
  longformer = lambda q, k, v, extras: sliding_window_attention(q, k, v, extras[0], False,
                                                                window, block=16)
  oracle = lambda q, k, v, extras: masked_attention(q, k, v, extras[1])
  assert_same_values_and_grads(longformer, oracle, q, k, v, extras)


def test_causality_no_gradient_from_the_future():
  length, position = 48, 20
  q, k, v = make_qkv(length)
  global_mask = random_global(length).at[:, 30].set(True)
  cotangent = jnp.zeros(q.shape).at[:, :position + 1].set(1.0)

  def grads(q, k, v, global_mask):
    attention = lambda q, k, v: sliding_window_attention(
        q, k, v, None, True, window=6, dilation=2, global_mask=global_mask, block=8)
    return jax.vjp(attention, q, k, v)[1](cotangent)

  _, dk, dv = jit(grads)(q, k, v, global_mask)
  assert np.all(np.asarray(dk[:, position + 1:]) == 0)
  assert np.all(np.asarray(dv[:, position + 1:]) == 0)
  assert np.any(np.asarray(dk[:, :position + 1]) != 0)


def test_padding_keys_change_nothing():
  length = 70
  q, k, v = make_qkv(length)
  mask = random_mask(length, keep=0.6)
  global_mask = random_global(length, count=4)
  attention = jit(lambda k, v, mask, global_mask: sliding_window_attention(
      q, k, v, mask, False, window=5, global_mask=global_mask, block=8))
  noise_k, noise_v = make_qkv(length, seed=3)[:2]
  hidden = ~mask[:, :, None, None]
  out = attention(k, v, mask, global_mask)
  changed = attention(jnp.where(hidden, 100 * noise_k, k), jnp.where(hidden, noise_v, v), mask,
                      global_mask)
  np.testing.assert_allclose(np.asarray(changed), np.asarray(out), rtol=0, atol=1e-6)


def test_query_with_no_visible_key_gives_zeros_and_finite_gradients():
  length, window = 64, 4
  q, k, v = make_qkv(length)
  # Row 0: every key is padding. Row 1: keys 10..39 are padding, so queries
  # 15..34 see no key.
  mask = jnp.ones((2, length), bool).at[0].set(False).at[1, 10:40].set(False)
  extras = (mask, dense_visibility(length, window, mask=mask))
  longformer = lambda q, k, v, extras: sliding_window_attention(q, k, v, extras[0], False,
                                                                window, block=8)
  oracle = lambda q, k, v, extras: masked_attention(q, k, v, extras[1])
  out, dq, dk, dv = assert_same_values_and_grads(longformer, oracle, q, k, v, extras)
  for x in (out, dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all(np.asarray(out[0]) == 0)
  assert np.all(np.asarray(out[1, 15:35]) == 0)
  assert np.all(np.asarray(dq[0]) == 0)


def test_bfloat16_inputs():
  length, window = 80, 6
  q, k, v = make_qkv(length, dtype=jnp.bfloat16)
  global_mask = random_global(length, count=2)
  extras = (global_mask, dense_visibility(length, window, global_mask=global_mask))
  longformer = lambda q, k, v, extras: sliding_window_attention(
      q, k, v, None, False, window, global_mask=extras[0], max_global=2, block=8)
  oracle = lambda q, k, v, extras: masked_attention(q, k, v, extras[1])
  results = assert_same_values_and_grads(longformer, oracle, q, k, v, extras, rtol=2e-2)
  assert all(x.dtype == jnp.bfloat16 for x in results)


def test_module_under_jit_and_pmap_matches_one_device():
  attention = ea.make_attention('longformer', window=5, dilation=2, max_global=3, block=8)
  module_under_pmap_matches_one_device(attention, random_global(40, batch=4, count=2))


def test_no_length_squared_array_forward_or_backward():
  length, window = 2048, 16
  q, k, v = make_qkv(length, batch=1)
  global_mask = jnp.zeros((1, length), bool).at[0, 3].set(True)
  loss = lambda q, k, v, global_mask: jnp.sum(sliding_window_attention(
      q, k, v, None, False, window, global_mask=global_mask, max_global=4) ** 2)
  largest = largest_compiled_array(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, global_mask)
  # Inputs are length * 16 elements; a full score matrix would be length**2 * 2.
  assert largest <= 64 * length


def test_registered_with_its_options():
  assert 'longformer' in ea.available_attentions()
  assert ea.attention_class('longformer') is LongformerAttention
  assert LongformerAttention.options == ('window', 'dilation', 'max_global', 'block',
                                        'check_global_count')
  attention = ea.make_attention('longformer', window=3)
  q, k, v = make_qkv(20)
  out = jit(attention)(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize('option,value', [
    ('window', 0), ('window', -1), ('window', 2.5), ('window', True), ('dilation', 0),
    ('dilation', '2'), ('max_global', 0), ('block', 0), ('block', 8.0)])
def test_bad_options_name_the_argument(option, value):
  with pytest.raises(ValueError, match=option):
    ea.make_attention('longformer', **{option: value})


def test_unknown_option_lists_valid_ones():
  with pytest.raises(ValueError, match='window'):
    ea.make_attention('longformer', windw=4)


def test_bad_inputs():
  attention = ea.make_attention('longformer', window=2, max_global=2)
  assert_bad_inputs_raise(attention)
  q, k, v = make_qkv(10)
  with pytest.raises(ValueError, match=r'global_mask must be a bool.*int32'):
    attention(q, k, v, global_mask=jnp.ones((2, 10), jnp.int32))
  with pytest.raises(ValueError, match=r'global_mask must have shape .*\(2, 10\).*\(2, 9\)'):
    attention(q, k, v, global_mask=jnp.ones((2, 9), bool))
  with pytest.raises(ValueError, match=r'global_mask has 3 .*max_global=2'):
    attention(q, k, v, global_mask=jnp.zeros((2, 10), bool).at[1, :3].set(True))
