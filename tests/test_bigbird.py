"""Tests of the 'bigbird' attention against exact attention and a dense-mask oracle.

Random blocks are arguments of the pure function, so the oracle is built from
the very blocks the attention read.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.attention import bigbird
from efficient_attn.attention.full import dense_attention
from helpers import (HEADS, assert_same_values_and_grads, jit, largest_compiled_array, make_qkv,
                     masked_attention, module_under_pmap_matches_one_device, random_mask)

BATCH = 2


def draw(length, block_len, window, num_global, num_random, causal, seed=0):
  return bigbird.draw_random_blocks(jax.random.key(seed), HEADS, length, block_len, window,
                                    num_global, num_random, causal)


def dense_visibility(random_blocks, length, block_len, window, num_global, causal, mask,
                     batch=BATCH):
  """The bool `[batch, heads, len, len]` visibility that BigBird stands for, from its blocks."""
  random_blocks = np.asarray(random_blocks)
  num_blocks = -(-length // block_len)
  first = min(num_global, num_blocks)
  block = np.arange(length) // block_len
  visible = np.zeros((HEADS, length, length), bool)
  for h in range(HEADS):
    pairs = np.abs(np.arange(num_blocks)[:, None] - np.arange(num_blocks)) <= window // 2
    pairs[:first] = pairs[:, :first] = True
    for i in range(first, num_blocks):
      drawn = random_blocks[h, i - first]
      pairs[i, drawn[drawn >= 0]] = True
    visible[h] = pairs[block[:, None], block[None, :]]
  if causal:
    visible &= np.tril(np.ones((length, length), bool))
  mask = np.ones((batch, length), bool) if mask is None else np.asarray(mask)
  return jnp.asarray(visible[None] & mask[:, None, None, :])


@pytest.mark.parametrize('causal,padded', [(False, False), (False, True), (True, True)])
def test_blocks_covering_everything_are_exact_attention(causal, padded):
  # 11 blocks of 4 (the last one short): 1 global, 3 window and 8 random
  # blocks per query block cover every block.
  length, block_len = 43, 4
  q, k, v = make_qkv(length)
  mask = random_mask(length) if padded else None
  blocks = draw(length, block_len, 3, 1, 8, causal)
  assert blocks.shape == (HEADS, 10, 8)
  attention = lambda q, k, v, extras: bigbird.bigbird_attention(
      q, k, v, extras[0], extras[1], causal, block_len, 3, 1)
  dense = lambda q, k, v, extras: dense_attention(q, k, v, extras[1], causal)
  assert_same_values_and_grads(attention, dense, q, k, v, (blocks, mask))


@pytest.mark.parametrize('block_len,window,num_global,num_random,causal', [
    (4, 3, 1, 2, False), (4, 3, 2, 3, True), (8, 1, 0, 2, False), (4, 5, 1, 1, True)])
def test_pattern_matches_dense_oracle_with_the_same_random_blocks(block_len, window, num_global,
                                                                 num_random, causal):
  length = 60
  q, k, v = make_qkv(length)
  mask = random_mask(length)
  blocks = draw(length, block_len, window, num_global, num_random, causal)
  extras = (blocks, mask, dense_visibility(blocks, length, block_len, window, num_global, causal,
                                           mask))
  attention = lambda q, k, v, extras: bigbird.bigbird_attention(
      q, k, v, extras[0], extras[1], causal, block_len, window, num_global)
  oracle = lambda q, k, v, extras: masked_attention(q, k, v, extras[2])
  assert_same_values_and_grads(attention, oracle, q, k, v, extras)


@pytest.mark.parametrize('causal', [False, True])
def test_random_blocks_are_distinct_uniform_candidates(causal):
  num_blocks, window, num_global, num_random = 12, 3, 2, 3
  draws = jax.vmap(lambda key: bigbird.draw_random_blocks(
      key, HEADS, num_blocks * 4, 4, window, num_global, num_random, causal))(
          jax.random.split(jax.random.key(0), 2000))
  draws = np.asarray(draws)  # [draws, heads, query blocks, slots]
  allowed = bigbird.random_candidates(num_blocks, window, num_global, causal)
  for i, candidates in enumerate(allowed):
    drawn = draws[:, :, i]
    count = min(num_random, candidates.sum())
    # The first `count` slots hold distinct candidates, the rest are empty.
    assert np.all(drawn[..., count:] == -1)
    assert np.all(candidates[drawn[..., :count]])
    assert np.all(np.diff(np.sort(drawn[..., :count], axis=-1), axis=-1) != 0)
    if candidates.sum() > num_random:
      # Each candidate equally often: count / candidates of the draws.
      frequency = np.bincount(drawn[..., :count].ravel(), minlength=num_blocks)[candidates]
      expected = drawn.shape[0] * HEADS * count / candidates.sum()
      assert np.all(np.abs(frequency - expected) < 6 * np.sqrt(expected)), frequency
  assert not np.array_equal(draws[0, 0], draws[0, 1]), 'each head draws its own blocks'
  if causal:
    # Query block 2 (the first non-global) has no earlier non-global block.
    assert np.all(draws[:, :, :2] == -1)


def test_redraw_policy_fresh_in_training_fixed_when_deterministic():
  attn = ea.make_attention('bigbird', block_len=4, num_global_blocks=1, num_random_blocks=2,
                           rngs=nnx.Rngs(0))
  q, k, v = make_qkv(48)
  blocks_of = lambda **kw: bigbird.draw_random_blocks(
      attn.call_key(**kw), HEADS, 48, 4, 3, 1, 2)
  fixed = blocks_of(deterministic=True, rngs=None)
  np.testing.assert_array_equal(blocks_of(deterministic=True, rngs=None), fixed)
  trained = [blocks_of(deterministic=None, rngs=None) for _ in range(2)]
  assert not np.array_equal(trained[0], trained[1]), 'every training call draws'
  attn.eval()
  np.testing.assert_array_equal(blocks_of(deterministic=None, rngs=None), fixed)
  # The module's output is the pure function's with those blocks.
  twin = ea.make_attention('bigbird', block_len=4, num_global_blocks=1, num_random_blocks=2,
                           rngs=nnx.Rngs(0))
  module, pure = jit(lambda q, k, v: (twin(q, k, v, deterministic=True),
                                      bigbird.bigbird_attention(q, k, v, fixed, block_len=4,
                                                                num_global_blocks=1)))(q, k, v)
  np.testing.assert_allclose(module, pure, atol=1e-6)


def test_causality_no_gradient_from_the_future():
  length, position = 64, 37
  q, k, v = make_qkv(length)
  blocks = draw(length, 4, 3, 2, 6, True)
  cotangent = jnp.zeros(q.shape).at[:, :position + 1].set(1.0)

  def grads(q, k, v, blocks):
    attention = lambda q, k, v: bigbird.bigbird_attention(q, k, v, blocks, None, True, 4, 3, 2)
    return jax.vjp(attention, q, k, v)[1](cotangent)

  dq, dk, dv = jit(grads)(q, k, v, blocks)
  for g in (dk, dv):
    assert np.all(np.asarray(g[:, position + 1:]) == 0)
    assert np.all(np.asarray(g[:, :position + 1]) != 0)
  assert np.all(np.asarray(dq[:, position + 1:]) == 0)


def test_padding_changes_nothing_and_padded_rows_see_no_key():
  length, block_len = 40, 4
  q, k, v = make_qkv(length)
  # Row 0: the first (global) block and keys 20..27 are padding; row 1: all padding.
  mask = jnp.ones((BATCH, length), bool).at[0, :4].set(False).at[0, 20:28].set(False)
  mask = mask.at[1].set(False)
  blocks = draw(length, block_len, 3, 1, 2, False)
  noise = make_qkv(length, seed=3)
  hidden = ~mask[:, :, None, None]

  def call(q, k, v, blocks, mask):
    loss = lambda q, k, v: jnp.sum(bigbird.bigbird_attention(
        q, k, v, blocks, mask, False, block_len, 3, 1) ** 2)
    return bigbird.bigbird_attention(q, k, v, blocks, mask, False, block_len, 3, 1), jax.grad(
        loss, argnums=(0, 1, 2))(q, k, v)

  call = jit(call)
  out, grads = call(q, k, v, blocks, mask)
  changed, _ = call(*(jnp.where(hidden, 100 * n, x) for x, n in zip((q, k, v), noise)), blocks,
                    mask)
  real = np.asarray(mask)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, changed, 0), np.where(real, out, 0), atol=1e-6)
  assert np.all(np.asarray(out[1]) == 0)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0][1]) == 0)


def test_bfloat16_inputs():
  length, block_len = 48, 8
  q, k, v = make_qkv(length, dtype=jnp.bfloat16)
  mask = random_mask(length)
  blocks = draw(length, block_len, 3, 1, 1, False)
  extras = (blocks, mask, dense_visibility(blocks, length, block_len, 3, 1, False, mask))
  attention = lambda q, k, v, extras: bigbird.bigbird_attention(
      q, k, v, extras[0], extras[1], False, block_len, 3, 1)
  oracle = lambda q, k, v, extras: masked_attention(q, k, v, extras[2])
  results = assert_same_values_and_grads(attention, oracle, q, k, v, extras, rtol=2e-2)
  assert all(x.dtype == jnp.bfloat16 for x in results)


def test_module_under_jit_and_pmap_matches_one_device():
  attention = ea.make_attention('bigbird', block_len=4, num_global_blocks=1,
                                num_random_blocks=2, rngs=nnx.Rngs(0))
  module_under_pmap_matches_one_device(functools.partial(attention, rngs=jax.random.key(3)))


def test_no_length_squared_array_forward_or_backward():
  length = 2048
  q, k, v = make_qkv(length, batch=1)
  attention = ea.make_attention('bigbird', block_len=32, rngs=nnx.Rngs(0))
  loss = lambda q, k, v, key: jnp.sum(attention(q, k, v, causal=False, rngs=key) ** 2)
  largest = largest_compiled_array(jax.grad(loss, argnums=(0, 1, 2)), q, k, v,
                                   jax.random.key(0))
  # The gathered key strips hold heads * length * 8 blocks' keys (2 global, 3
  # window, 3 random), 256 * length elements; the scores would be 2 * length**2.
  assert largest <= 256 * length


def test_registered_with_its_options():
  assert ea.attention_class('bigbird') is bigbird.BigBirdAttention
  assert bigbird.BigBirdAttention.options == ('block_len', 'num_window_blocks',
                                              'num_global_blocks', 'num_random_blocks')
  with pytest.raises(ValueError, match='needs rngs'):
    ea.make_attention('bigbird')


def test_everything_global_is_exact_attention():
  # Two blocks, both global; a sequence shorter than one block.
  for length, block_len in ((16, 8), (5, 8)):
    q, k, v = make_qkv(length)
    attention = ea.make_attention('bigbird', block_len=block_len, rngs=nnx.Rngs(0))
    both = jit(lambda q, k, v: (attention(q, k, v, deterministic=True), dense_attention(q, k, v)))
    np.testing.assert_allclose(*both(q, k, v), atol=1e-6)


@pytest.mark.parametrize('option,value,message', [
    ('block_len', 0, 'block_len must be a positive int'),
    ('block_len', 2.0, 'block_len must be a positive int'),
    ('num_window_blocks', 0, 'num_window_blocks must be a positive int'),
    ('num_window_blocks', 4, 'num_window_blocks must be odd'),
    ('num_global_blocks', -1, 'num_global_blocks must be a non-negative int'),
    ('num_global_blocks', True, 'num_global_blocks must be a non-negative int'),
    ('num_random_blocks', '3', 'num_random_blocks must be a non-negative int')])
def test_bad_options_name_the_argument(option, value, message):
  with pytest.raises(ValueError, match=message):
    ea.make_attention('bigbird', rngs=nnx.Rngs(0), **{option: value})


def test_bad_inputs():
  attention = ea.make_attention('bigbird', block_len=4, rngs=nnx.Rngs(0))
  q, k, v = make_qkv(16)
  with pytest.raises(ValueError, match='rank 4'):
    attention(q[0], k, v)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    attention(q[:, :8], k, v)
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((BATCH, 15), bool))
  blocks = draw(16, 4, 3, 2, 1, False)
  with pytest.raises(ValueError, match=r'random_blocks must be an int array .*\(2, 2\)'):
    bigbird.bigbird_attention(q, k, v, blocks[:, :1], block_len=4)
  with pytest.raises(ValueError, match='random_blocks must be an int array'):
    bigbird.bigbird_attention(q, k, v, blocks.astype(jnp.float32), block_len=4)
  with pytest.raises(ValueError, match='num_window_blocks must be odd'):
    bigbird.bigbird_attention(q, k, v, blocks, block_len=4, num_window_blocks=2)
