"""Sparse Sinkhorn attention: exact limit, Sinkhorn normalisation, oracle, causality, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.attention import sinkhorn
from helpers import (assert_exact_at_real_positions, bfloat16_close_to_float32,
                     causal_zero_gradient_at_every_split,
                     fully_masked_row_gives_zeros_and_finite_gradients, largest_array, normal_qkv,
                     padding_changes_no_real_output, pmap_over_four_devices_matches_one_call, real)

BATCH, LENGTH, HEADS, DIM, VALUE_DIM = 2, 20, 2, 8, 6
BLOCK = 4  # five blocks
# Row 0: positions 0..13 real (block 3 partly padded, block 4 all padding); row 1: 0..6.
MASK = np.arange(LENGTH)[None, :] < np.array([[14], [7]])


def inputs(dtype=jnp.float32, seed=0):
  return normal_qkv((BATCH, LENGTH, HEADS, DIM), VALUE_DIM, dtype, seed)


def noise(seed=3):
  n_blocks = LENGTH // BLOCK
  return jax.random.gumbel(jax.random.key(seed), (BATCH, HEADS, n_blocks, n_blocks))


def test_one_block_equals_exact_attention_outputs_and_gradients():
  assert_exact_at_real_positions(
      lambda q, k, v, mask, causal: sinkhorn.sinkhorn_attention(q, k, v, mask, causal,
                                                                block_len=32),
      *inputs(), MASK)


def test_sinkhorn_is_doubly_stochastic_and_causal_rows_see_only_past_blocks():
  logits = 2 * jax.random.normal(jax.random.key(1), (3, 6, 6))
  p = np.asarray(sinkhorn.sinkhorn(logits, 50))
  np.testing.assert_allclose(p.sum(-1), 1, atol=1e-5)
  np.testing.assert_allclose(p.sum(-2), 1, atol=1e-5)
  one = np.asarray(sinkhorn.sinkhorn(logits, 1))
  np.testing.assert_allclose(one.sum(-2), 1, atol=1e-5)  # the last step normalises columns
  assert np.abs(one.sum(-1) - 1).max() > 1e-3  # rows not yet
  causal = np.asarray(sinkhorn.sinkhorn(logits, 50, causal=True))
  assert np.all(causal[:, np.triu_indices(6)[0], np.triu_indices(6)[1]] == 0)
  np.testing.assert_allclose(causal[:, 1:].sum(-1), 1, atol=1e-6)
  # Row i is the softmax of row i of the logits over j < i.
  np.testing.assert_allclose(causal[:, 3, :3], jax.nn.softmax(logits[:, 3, :3]), atol=1e-6)


def oracle(q, k, v, mask, causal, temperature, noise):
  """numpy: each query block's softmax over its own block and P-sorted real keys."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, n, h, d = q.shape
  nb = n // BLOCK
  blocks = lambda x: x.reshape(b, nb, BLOCK, h, -1).transpose(0, 3, 1, 2, 4)
  qb, kb, vb = blocks(q), blocks(k), blocks(v)
  valid = mask.reshape(b, nb, BLOCK)
  logits = np.asarray(sinkhorn.sort_logits(jnp.asarray(qb, jnp.float32),
                                           jnp.asarray(kb, jnp.float32), valid, causal))
  p = np.asarray(sinkhorn.sinkhorn((logits + noise) / temperature, 7, causal), np.float64)
  out = np.zeros((b, h, nb, BLOCK, v.shape[-1]))
  for bi, hi, i in np.ndindex(b, h, nb):
    weights = p[bi, hi, i][:, None] * valid[bi]  # [nb, block]
    total = weights.sum(0)
    sorted_k = np.einsum('jt,jtd->td', weights, kb[bi, hi]) / np.maximum(total, 1e-30)[:, None]
    sorted_v = np.einsum('jt,jtd->td', weights, vb[bi, hi]) / np.maximum(total, 1e-30)[:, None]
    keys = np.concatenate([kb[bi, hi, i], sorted_k])
    values = np.concatenate([vb[bi, hi, i], sorted_v])
    for t in range(BLOCK):
      own = valid[bi, i] & ((np.arange(BLOCK) <= t) if causal else True)
      visible = np.concatenate([own, total > 0])
      if not visible.any():
        continue
      s = keys @ qb[bi, hi, i, t] / np.sqrt(d)
      w = np.where(visible, np.exp(s - s[visible].max()), 0)
      out[bi, hi, i, t] = w @ values / w.sum()
  return out.transpose(0, 2, 3, 1, 4).reshape(b, n, h, -1)


@pytest.mark.parametrize('causal', [False, True])
def test_matches_numpy_oracle_with_noise_and_padding(causal):
  q, k, v = inputs()
  got = sinkhorn.sinkhorn_attention(q, k, v, MASK, causal, block_len=BLOCK, temperature=0.5,
                                    noise=noise())
  want = oracle(q, k, v, MASK, causal, 0.5, np.asarray(noise()))
  np.testing.assert_allclose(real(got, MASK), real(want, MASK), atol=1e-5)


def test_soft_sorted_block_follows_a_hard_permutation():
  _, k, v = inputs()
  kb = sinkhorn._blocks(k, BLOCK)
  valid = np.ones((BATCH, LENGTH // BLOCK, BLOCK), bool)
  order = np.array([2, 0, 4, 1, 3])
  hard = jnp.broadcast_to(jnp.eye(5)[order], (BATCH, HEADS, 5, 5))
  sorted_k, seen = sinkhorn.sort_blocks(hard, kb, valid)
  np.testing.assert_allclose(sorted_k, kb[:, :, order], atol=1e-6)
  assert np.all(seen)
  # A padded row is left out and the others renormalised; all padded: not valid.
  valid[0, 2, 1] = False
  valid[0, :, 3] = False
  half = jnp.full((BATCH, HEADS, 5, 5), 0.0).at[:, :, 0, 2].set(0.5).at[:, :, 0, 4].set(0.5)
  sorted_k, seen = sinkhorn.sort_blocks(half, kb, valid)
  np.testing.assert_allclose(sorted_k[0, :, 0, 1], kb[0, :, 4, 1], atol=1e-6)
  np.testing.assert_allclose(sorted_k[0, :, 0, 0], (kb[0, :, 2, 0] + kb[0, :, 4, 0]) / 2,
                             atol=1e-6)
  assert not np.any(seen[0, :, 0, 3]) and np.all(seen[0, :, 0, :3])


def test_causal_has_zero_gradient_from_the_future_at_every_split():
  attn = ea.make_attention('sinkhorn', block_len=BLOCK, gumbel_noise=True, rngs=nnx.Rngs(0))
  key = jax.random.key(5)
  causal_zero_gradient_at_every_split(
      lambda q, k, v: attn(q, k, v, mask=MASK, causal=True, rngs=key), *inputs(), (2, 5, 6, 9))


def test_padding_never_leaks_through_the_sorted_blocks():
  call = jax.jit(lambda q, k, v, causal: sinkhorn.sinkhorn_attention(
      q, k, v, MASK, causal, block_len=BLOCK, noise=noise()), static_argnums=3)
  padding_changes_no_real_output(call, inputs(), inputs(seed=1), MASK)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  fully_masked_row_gives_zeros_and_finite_gradients(
      lambda q, k, v, mask, causal: sinkhorn.sinkhorn_attention(q, k, v, mask, causal,
                                                                block_len=BLOCK),
      *inputs(), MASK)


def test_gumbel_noise_from_call_rngs_only_when_training():
  q, k, v = inputs()
  attn = ea.make_attention('sinkhorn', block_len=BLOCK, gumbel_noise=True, rngs=nnx.Rngs(0))
  plain = sinkhorn.sinkhorn_attention(q, k, v, block_len=BLOCK)
  np.testing.assert_array_equal(attn(q, k, v, deterministic=True), plain)
  first, second = (attn(q, k, v, rngs=jax.random.key(s)) for s in (1, 2))
  assert not np.allclose(first, plain) and not np.allclose(first, second)
  np.testing.assert_array_equal(attn(q, k, v, rngs=jax.random.key(1)), first)
  attn.eval()
  np.testing.assert_array_equal(attn(q, k, v), plain)
  quiet = ea.make_attention('sinkhorn', block_len=BLOCK, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(quiet(q, k, v, rngs=jax.random.key(1)), plain)


def test_pmap_over_four_devices_matches_one_call():
  pmap_over_four_devices_matches_one_call(
      lambda q, k, v, m: sinkhorn.sinkhorn_attention(q, k, v, m, block_len=BLOCK), *inputs(),
      MASK)


def test_bfloat16_close_to_float32():
  bfloat16_close_to_float32(
      lambda q, k, v: sinkhorn.sinkhorn_attention(q, k, v, MASK, block_len=BLOCK), *inputs(),
      MASK)


def test_errors():
  q, k, v = inputs()
  for option, value, message in (('block_len', 0, 'block_len must be a positive int'),
                                 ('sinkhorn_iters', 1.5, 'sinkhorn_iters must be a positive'),
                                 ('temperature', 0.0, 'temperature must be a number > 0'),
                                 ('gumbel_noise', 'yes', "gumbel_noise='yes' is not supported")):
    with pytest.raises(ValueError, match=message):
      ea.make_attention('sinkhorn', rngs=nnx.Rngs(0), **{option: value})
  with pytest.raises(ValueError, match='needs q_len == kv_len'):
    sinkhorn.sinkhorn_attention(q[:, :12], k, v)
  with pytest.raises(ValueError, match='noise must have shape'):
    sinkhorn.sinkhorn_attention(q, k, v, block_len=BLOCK, noise=noise()[:, :, :4])
  with pytest.raises(ValueError, match='needs rngs'):
    ea.make_attention('sinkhorn')


def test_no_quadratic_array_in_forward_or_backward():
  n, heads = 2048, 2
  x = jax.ShapeDtypeStruct((1, n, heads, 16), jnp.float32)
  for causal in (False, True):
    loss = lambda q, k, v: jnp.sum(sinkhorn.sinkhorn_attention(q, k, v, causal=causal,
                                                               block_len=32))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x).jaxpr
    assert largest_array(jaxpr) <= heads * n * 2 * 32  # the block x 2 block logits
