"""Tests of the 'longformer' attention against exact attention with explicit masks."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention import base
from efficient_attn.attention.full import dense_attention
from efficient_attn.attention.longformer import LongformerAttention, sliding_window_attention

HEADS, HEAD_DIM = 2, 8
# The tests check values, not speed: skip XLA's slow backend optimisations.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def make_qkv(length, batch=2, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  shape = (batch, length, HEADS, HEAD_DIM)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))


def random_mask(length, batch=2, seed=1, keep=0.8):
  return jnp.asarray(np.random.default_rng(seed).random((batch, length)) < keep)


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


def masked_attention(q, k, v, visible):
  """Exact attention under an explicit bool `[batch, q_len, kv_len]` mask: the oracle."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
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


def assert_close(actual, expected, rtol=1e-5):
  for a, e in zip(actual, expected):
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.all(np.isfinite(a))
    # Relative to the largest reference value; absolute where that is below 1
    # (gradients that are exactly 0 in exact arithmetic).
    error = np.abs(a - e).max() / max(np.abs(e).max(), 1.0)
    assert error <= rtol, f'relative error {error}'


def assert_same_values_and_grads(attention, oracle, q, k, v, extras=None, rtol=1e-5):
  """`attention` and `oracle`, both called as `f(q, k, v, extras)`, agree in outputs and
  gradients. Masks travel in `extras` as arguments, not as constants XLA would fold."""
  both = jit(lambda q, k, v, extras: (value_and_grads(attention, q, k, v, extras),
                                      value_and_grads(oracle, q, k, v, extras)))
  actual, expected = both(q, k, v, extras)
  assert_close(actual, expected, rtol)
  return actual


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
  length = 40
  attention = ea.make_attention('longformer', window=5, dilation=2, max_global=3, block=8)
  q, k, v = make_qkv(length, batch=4)
  mask = random_mask(length, batch=4)
  global_mask = random_global(length, batch=4, count=2)
  cotangent = make_qkv(length, batch=4, seed=5)[0]

  def value_and_grads_of_module(q, k, v, mask, global_mask, cotangent):
    out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, mask, True, global_mask), q, k, v)
    return (out,) + pullback(cotangent)

  args = (q, k, v, mask, global_mask, cotangent)
  one_device = jit(value_and_grads_of_module)(*args)
  devices = jax.local_device_count()
  assert devices == 4
  split = lambda x: x.reshape(devices, -1, *x.shape[1:])
  per_device = jax.pmap(value_and_grads_of_module)(*map(split, args))
  for d, o in zip(per_device, one_device):
    np.testing.assert_allclose(d.reshape(o.shape), o, rtol=0, atol=1e-6)


def test_no_length_squared_array_forward_or_backward():
  length, window = 2048, 16
  q, k, v = make_qkv(length, batch=1)
  global_mask = jnp.zeros((1, length), bool).at[0, 3].set(True)
  loss = lambda q, k, v, global_mask: jnp.sum(sliding_window_attention(
      q, k, v, None, False, window, global_mask=global_mask, max_global=4) ** 2)
  grads = jit(jax.grad(loss, argnums=(0, 1, 2)))
  hlo = grads.lower(q, k, v, global_mask).compile().as_text()
  sizes = [np.prod([int(d) for d in dims.split(',') if d])
           for dims in re.findall(r'[a-z]+\d*\[([\d,]*)\]', hlo)]
  # Inputs are length * 16 elements; a full score matrix would be length**2 * 2.
  assert max(sizes) <= 64 * length


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
  q, k, v = make_qkv(10)
  with pytest.raises(ValueError, match='rank 4'):
    attention(q[0], k, v)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    attention(q[:, :5], k, v)
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((2, 9), bool))
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((2, 10), jnp.int32))
  with pytest.raises(ValueError, match=r'global_mask must be a bool.*int32'):
    attention(q, k, v, global_mask=jnp.ones((2, 10), jnp.int32))
  with pytest.raises(ValueError, match=r'global_mask must have shape .*\(2, 10\).*\(2, 9\)'):
    attention(q, k, v, global_mask=jnp.ones((2, 9), bool))
  with pytest.raises(ValueError, match=r'global_mask has 3 .*max_global=2'):
    attention(q, k, v, global_mask=jnp.zeros((2, 10), bool).at[1, :3].set(True))
