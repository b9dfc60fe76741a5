"""Tests of the 'lsh' attention against exact attention and a dense LSH oracle.

Compiling is most of the cost here, so tests share a few jitted configurations
(`lsh_function`) with rotations passed as arguments.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.attention import base, core, lsh
from efficient_attn.attention.full import dense_attention
from helpers import largest_array, relative_error

BATCH, LENGTH, HEADS, DIM = 2, 40, 2, 8


def random_inputs(length=LENGTH, kv_len=None, batch=BATCH, dtype=jnp.float32, seed=0):
  """q, k, v and an output cotangent, standard normal (numpy: nothing to compile)."""
  kv_len = length if kv_len is None else kv_len
  rng = np.random.default_rng(seed)
  shapes = [(batch, n, HEADS, DIM) for n in (length, kv_len, kv_len, length)]
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)


def padding_mask(batch=BATCH, length=LENGTH, seed=1):
  """A random key mask with about 30% padding, position 0 of row 0 padded."""
  mask = np.random.default_rng(seed).random((batch, length)) > 0.3
  mask[0, 0] = False
  return jnp.asarray(mask)


NO_PADDING = jnp.ones((BATCH, LENGTH), bool)


def one_bucket(n_hashes=2):
  """Rotations that put every token into one bucket (no hashing)."""
  return jnp.zeros((HEADS, n_hashes, DIM, 0), jnp.float32)


def rotations(seed, n_hashes=2, n_buckets=4):
  """Gaussian rotations as `lsh.draw_rotations` makes them, from numpy."""
  shape = (HEADS, n_hashes, DIM, n_buckets // 2)
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# Configurations that several tests share (each compiles once). Non-causal
# shared: 6 chunks a round, looking forward too; non-causal separate: 5 chunks;
# causal shared and separate: 5 chunks.
NON_CAUSAL_SHARED = dict(causal=False, chunk_len=7, shared_qk=True, n_chunks_after=1)
NON_CAUSAL_SEPARATE = dict(causal=False, chunk_len=8, shared_qk=False)
CAUSAL_SHARED = dict(causal=True, chunk_len=8, shared_qk=True)
CAUSAL_SEPARATE = dict(causal=True, chunk_len=8, shared_qk=False)


@functools.cache
def lsh_function(causal=False, chunk_len=8, shared_qk=True, n_chunks_after=0):
  """`lsh_attention` with static options, as a function of (q, k, v, mask, rotations)."""
  return lambda q, k, v, mask, rotations: lsh.lsh_attention(
      q, k, v, rotations, mask, causal, chunk_len, shared_qk, n_chunks_after=n_chunks_after)


@functools.partial(jax.jit, static_argnums=0)
def outputs_and_grads(attention, q, k, v, mask, cotangent, extra):
  """attention(q, k, v, mask, extra) and the gradients of <output, cotangent> w.r.t. q, k, v."""

  def loss(q, k, v):
    out = attention(q, k, v, mask, extra)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grads, out = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def assert_close(attention, reference, inputs, masks, rotations, tolerance,
                 reference_extra=None):
  """Outputs and gradients w.r.t. q, k, v agree within a relative `tolerance`, per mask.

  `attention` gets `rotations` as its last argument, `reference` gets
  `reference_extra(mask)` (default: the rotations too).
  """
  q, k, v, cotangent = inputs
  for mask in masks:
    extra = rotations if reference_extra is None else reference_extra(mask)
    out, grads = outputs_and_grads(attention, q, k, v, mask, cotangent, rotations)
    ref_out, ref_grads = outputs_and_grads(reference, q, k, v, mask, cotangent, extra)
    assert relative_error(out, ref_out) <= tolerance
    for grad, ref_grad in zip(grads, ref_grads):
      assert relative_error(grad, ref_grad) <= tolerance


def unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def shared_qk_reference(q, v, mask, causal):
  """Dense attention with keys unit(q); a token sees itself only if it sees no other key."""
  length = q.shape[1]
  visible = base.key_mask_or_ones(mask, q.shape[0], length)[:, None, None, :]
  if causal:
    visible = visible & jnp.tril(jnp.ones((length, length), bool))
  itself = jnp.eye(length, dtype=bool)
  others = visible & ~itself
  visible = jnp.where(others.any(-1, keepdims=True), others, visible & itself)
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, unit(q)) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(visible, scores, base.MASK_VALUE), axis=-1)
  probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def numpy_buckets(x, rotations):
  """Angular LSH buckets `[b, h, rounds, n]` of x `[b, h, n, d]` by argmax in float64.

  A tuple of rotations is a factorised hash: bucket = b_0 + n_0 * b_1 + ...
  """
  buckets, stride = 0, 1
  for factor in rotations if isinstance(rotations, tuple) else (rotations,):
    rotated = np.einsum('bhnd,hrdk->bhrnk', np.asarray(x, np.float64), np.asarray(factor))
    buckets = buckets + stride * np.argmax(np.concatenate([rotated, -rotated], -1), -1)
    stride *= 2 * factor.shape[-1]
  return buckets


def sorted_chunks(x, valid, rotations, chunk, spread=False):
  """The chunk of each token after sorting by (bucket, position): `[b, h, rounds, n]`.

  Tokens not `valid` `[b, n]` sort last; with `spread`, valid and invalid tokens
  are then interleaved evenly, the k-th of m at about n * (k + 1/2) / m.
  """
  batch, length, heads, dim = x.shape
  padded = -(-length // chunk) * chunk
  rows = np.zeros((batch, heads, padded, dim), np.float32)
  rows[:, :, :length] = np.asarray(x).transpose(0, 2, 1, 3)
  valid = np.pad(np.asarray(valid), [(0, 0), (0, padded - length)])[:, None, None, :]
  n_buckets = math.prod(max(1, 2 * r.shape[-1])
                        for r in (rotations if isinstance(rotations, tuple) else (rotations,)))
  buckets = np.where(valid, numpy_buckets(rows, rotations), n_buckets)
  order = np.argsort(buckets, axis=-1, kind='stable')
  if spread:
    sorted_valid = np.take_along_axis(np.broadcast_to(valid, buckets.shape), order, -1)
    count = sorted_valid.sum(-1, keepdims=True)
    rank = np.arange(padded)
    among = np.where(sorted_valid, rank, rank - count).astype(np.float32)
    total = np.maximum(np.where(sorted_valid, count, padded - count), 1).astype(np.float32)
    order = np.take_along_axis(order, np.argsort((among + 0.5) / total, -1, kind='stable'), -1)
  rank = np.argsort(order, axis=-1)
  return rank[..., :length] // chunk


def lsh_visibility(q, k, mask, rotations, causal, chunk_len, shared_qk, n_chunks_after=0):
  """Which keys each query sees per round, from LSH's definition: bool `[b, h, rounds, q, k]`.

  Query i sees key j in a round iff their chunks after sorting by (bucket,
  position) are the same or neighbours (the one before, and after with
  `n_chunks_after`), j is not padding, and j <= i when causal. Padding keys get
  bucket n_buckets, after all others; in self-attention so do padded queries; in
  cross-attention real and padding keys are spread evenly over the chunks.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  chunks = lsh.num_chunks(q_len, kv_len, chunk_len)
  mask = np.asarray(mask)
  cross = q_len != kv_len
  q_valid = np.ones((q.shape[0], q_len), bool) if cross else mask
  q_chunk = sorted_chunks(q, q_valid, rotations, -(-q_len // chunks))
  k_chunk = q_chunk if shared_qk else sorted_chunks(k, mask, rotations, -(-kv_len // chunks),
                                                    spread=cross)
  distance = (q_chunk[..., :, None] - k_chunk[..., None, :]) % chunks
  visible = (distance == 0) | (distance == 1 % chunks)
  if n_chunks_after:
    visible |= distance == -1 % chunks
  visible &= mask[:, None, None, None, :]
  if causal:
    visible &= np.tril(np.ones((q_len, kv_len), bool))
  return jnp.asarray(visible)


@functools.cache
def lsh_reference_function(shared_qk):
  """Dense attention per round over a given visibility, rounds weighted by their lse."""

  def attention(q, k, v, mask, visible):
    length = q.shape[1]
    if shared_qk:
      k = unit(q)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k)[:, :, None] / np.sqrt(q.shape[-1])
    scores = jnp.where(visible, scores, base.MASK_VALUE)
    if shared_qk:
      scores = jnp.where(visible & jnp.eye(length, dtype=bool), core.OWN_KEY_VALUE, scores)
    lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    out = jnp.einsum('bhrqk,bkhd->bhrqd', jnp.exp(scores - lse), v)
    out = jnp.where(lse > core.NO_KEY_THRESHOLD, out, 0.0)
    out = jnp.sum(out * jax.nn.softmax(lse, axis=2), axis=2)
    return out.transpose(0, 2, 1, 3)

  return attention


@functools.cache
def dense_function(causal):
  return lambda q, k, v, mask, rotations: dense_attention(q, k, v, mask, causal)


@functools.cache
def shared_qk_function(causal):
  return lambda q, k, v, mask, rotations: shared_qk_reference(q, v, mask, causal)


@pytest.mark.parametrize('causal', [False, True])
def test_one_bucket_one_chunk_is_exact_attention(causal):
  attention = lsh_function(causal, chunk_len=LENGTH, shared_qk=False)
  assert_close(attention, dense_function(causal), random_inputs(), [NO_PADDING, padding_mask()],
               one_bucket(), 1e-5)


def test_shared_qk_attends_to_unit_queries_and_not_itself():
  # Causal: query 0 sees only itself; with padding, some queries see no key.
  attention = lsh_function(causal=True, chunk_len=LENGTH, shared_qk=True)
  assert_close(attention, shared_qk_function(True), random_inputs(),
               [NO_PADDING, padding_mask()], one_bucket(), 1e-5)


def assert_matches_oracle(options, inputs, rotation, mask):
  """lsh_attention with `options` agrees with the dense oracle over `lsh_visibility`."""
  q, k = inputs[:2]
  visibility = lambda mask: lsh_visibility(q, k, mask, rotation, options['causal'],
                                           options['chunk_len'], options['shared_qk'],
                                           options.get('n_chunks_after', 0))
  assert_close(lsh_function(**options), lsh_reference_function(options['shared_qk']), inputs,
               [mask], rotation, 1e-5, reference_extra=visibility)


@pytest.mark.parametrize('options', [
    NON_CAUSAL_SHARED,
    NON_CAUSAL_SEPARATE,
    CAUSAL_SHARED,
    CAUSAL_SEPARATE,
    # 2 chunks: the chunk after is the chunk before.
    dict(causal=False, chunk_len=20, shared_qk=False, n_chunks_after=1),
])
def test_hashed_chunks_match_dense_oracle(options):
  assert_matches_oracle(options, random_inputs(), rotations(options['chunk_len']),
                        padding_mask())


def test_factorised_hashing_matches_dense_oracle():
  factors = (rotations(10, n_buckets=4), rotations(11, n_buckets=2))  # 8 buckets
  assert_matches_oracle(NON_CAUSAL_SEPARATE, random_inputs(), factors, padding_mask())


def test_hash_buckets_are_argmax_of_rotated_and_negated():
  x = random_inputs()[0].transpose(0, 2, 1, 3)
  rotation = rotations(0, n_hashes=3, n_buckets=8)
  np.testing.assert_array_equal(lsh.hash_buckets(x, rotation), numpy_buckets(x, rotation))
  assert np.max(lsh.hash_buckets(x, one_bucket())) == 0


def test_factorised_hash_buckets_combine_the_factors():
  x = random_inputs()[0].transpose(0, 2, 1, 3)
  factors = (rotations(1, n_hashes=3, n_buckets=6), rotations(2, n_hashes=3, n_buckets=4))
  buckets = np.asarray(lsh.hash_buckets(x, factors))
  np.testing.assert_array_equal(buckets, numpy_buckets(x, factors))
  np.testing.assert_array_equal(buckets % 6, numpy_buckets(x, factors[0]))
  assert len(np.unique(buckets)) > 12  # both factors vary (24 buckets)


def test_sort_by_bucket_is_stable_with_one_key_and_with_two(monkeypatch):
  buckets = np.random.default_rng(0).integers(0, 5, (3, 2, 50)).astype(np.int32)
  order = np.argsort(buckets, axis=-1, kind='stable')
  for max_key in (lsh._MAX_SORT_KEY, 10):  # 10: (bucket, position) pairs as two keys
    monkeypatch.setattr(lsh, '_MAX_SORT_KEY', max_key)
    got_order, inverse, sorted_buckets = lsh.sort_by_bucket(jnp.asarray(buckets), 4)
    np.testing.assert_array_equal(got_order, order)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(got_order), np.asarray(inverse), -1),
                                  np.broadcast_to(np.arange(50), buckets.shape))
    np.testing.assert_array_equal(sorted_buckets, np.take_along_axis(buckets, order, -1))


def test_bucket_factors_follow_trax_above_128():
  assert lsh.bucket_factors(1) == (1,)
  assert lsh.bucket_factors(128) == (128,)
  assert lsh.bucket_factors(256) == (16, 16)
  assert lsh.bucket_factors(512) == (32, 16)
  assert lsh.bucket_factors(200) == (16, 12)  # 192 buckets
  rotation = lsh.draw_rotations(jax.random.key(0), HEADS, 2, DIM, 512)
  assert [r.shape for r in rotation] == [(HEADS, 2, DIM, 16), (HEADS, 2, DIM, 8)]
  assert lsh.draw_rotations(jax.random.key(0), HEADS, 2, DIM, 128).shape == (HEADS, 2, DIM, 64)
  assert lsh.draw_rotations(jax.random.key(0), HEADS, 2, DIM, 1).shape == (HEADS, 2, DIM, 0)


def test_hash_buckets_in_blocks_of_rows(monkeypatch):
  x = random_inputs()[0].transpose(0, 2, 1, 3)
  rotation = rotations(0, n_hashes=3, n_buckets=8)
  monkeypatch.setattr(lsh, '_HASH_BLOCK_SIZE', 7 * HEADS * 3 * 4)  # blocks of 7 rows
  in_blocks = lambda x: lsh.hash_buckets(x, rotation)
  # The blocked path is taken (a loop over blocks), and it gives the same buckets.
  assert 'scan' in str(jax.make_jaxpr(in_blocks)(x))
  np.testing.assert_array_equal(jax.jit(in_blocks)(x), numpy_buckets(x, rotation))


def test_cross_attention_one_bucket_is_exact_attention():
  attention = lsh_function(chunk_len=LENGTH, shared_qk=False)
  inputs = random_inputs(length=24, kv_len=LENGTH)
  assert_close(attention, dense_function(False), inputs, [padding_mask()], one_bucket(), 1e-5)


def test_cross_attention_with_hashing_matches_dense_oracle():
  # 5 chunks of 5 queries and 8 keys; real keys spread over the key chunks.
  options = dict(NON_CAUSAL_SEPARATE, n_chunks_after=1)
  inputs = random_inputs(length=24, kv_len=LENGTH)
  assert_matches_oracle(options, inputs, rotations(12), padding_mask())


def test_cross_attention_queries_all_see_real_keys():
  # With keys padding last, late query chunks would meet padding keys only.
  q, k, v, _ = random_inputs(length=24, kv_len=LENGTH)
  mask = jnp.asarray(np.arange(LENGTH) < 16)[None].repeat(BATCH, 0)
  out = jax.jit(lsh_function(**NON_CAUSAL_SEPARATE))(q, k, v, mask, rotations(12))
  assert not np.any(np.all(np.asarray(out) == 0, axis=-1))


def test_rounds_with_identical_rotations_equal_one_round():
  once = rotations(3, n_hashes=1)
  twice = jnp.asarray(np.concatenate([once, once], axis=1))
  q, k, v, cotangent = random_inputs()
  attention = lsh_function(**NON_CAUSAL_SHARED)
  out, grads = outputs_and_grads(attention, q, k, v, padding_mask(), cotangent, once)
  out_twice, grads_twice = outputs_and_grads(attention, q, k, v, padding_mask(), cotangent, twice)
  assert relative_error(out_twice, out) <= 1e-6
  for grad, grad_twice in zip(grads, grads_twice):
    assert relative_error(grad_twice, grad) <= 1e-6


@pytest.mark.parametrize('shared_qk', [False, True])
def test_causal_outputs_ignore_later_keys_and_values(shared_qk):
  q, k, v, cotangent = random_inputs()
  attention = lsh_function(**(CAUSAL_SHARED if shared_qk else CAUSAL_SEPARATE))
  positions = np.arange(LENGTH)[None, :, None, None]
  for i in (0, 13, LENGTH - 2):
    # Only outputs at positions <= i enter the loss.
    _, grads = outputs_and_grads(attention, q, k, v, NO_PADDING,
                                 jnp.asarray(np.where(positions <= i, cotangent, 0.0)),
                                 rotations(4))
    for grad in grads:
      assert np.all(np.asarray(grad)[:, i + 1:] == 0)


@pytest.mark.parametrize('options', [NON_CAUSAL_SHARED, NON_CAUSAL_SEPARATE, CAUSAL_SHARED,
                                     CAUSAL_SEPARATE])
def test_padded_positions_change_no_real_output(options):
  q, k, v, cotangent = random_inputs()
  mask = padding_mask()
  attention = lsh_function(**options)
  hidden = ~np.asarray(mask)[:, :, None, None]
  noise = random_inputs(seed=6)[:3]
  out, _ = outputs_and_grads(attention, q, k, v, mask, cotangent, rotations(5))
  changed, _ = outputs_and_grads(
      attention, *[jnp.asarray(np.where(hidden, n, x)) for x, n in zip((q, k, v), noise)],
      mask, cotangent, rotations(5))
  real = np.asarray(mask)
  np.testing.assert_array_equal(np.asarray(out)[real], np.asarray(changed)[real])


def test_real_queries_of_self_attention_see_real_keys():
  # Non-causal self-attention: every real query has a real key in its own chunk.
  # (With queries sorted as if all were real, the last two of 5 query chunks
  # would meet padding keys only.)
  q, k, v, cotangent = random_inputs()
  mask = jnp.asarray(np.arange(LENGTH) < 16)[None].repeat(BATCH, 0)
  out, _ = outputs_and_grads(lsh_function(**NON_CAUSAL_SEPARATE), q, k, v, mask, cotangent,
                             rotations(5))
  assert not np.any(np.all(np.asarray(out)[np.asarray(mask)] == 0, axis=-1))


@pytest.mark.parametrize('shared_qk', [False, True])
def test_query_without_visible_key_is_zero_without_nan(shared_qk):
  q, k, v, cotangent = random_inputs()
  mask = np.array(padding_mask())
  mask[1] = False  # row 1: no real key at all
  mask = jnp.asarray(mask)
  attention = lsh_function(**(CAUSAL_SHARED if shared_qk else CAUSAL_SEPARATE))
  out, grads = outputs_and_grads(attention, q, k, v, mask, cotangent, rotations(7))
  out = np.asarray(out)
  assert np.all(out[1] == 0)
  assert np.all(out[0, 0] == 0)  # causal, and key 0 of row 0 is padding
  for x in (out,) + tuple(grads):
    assert np.isfinite(x).all()


def test_bfloat16_close_to_float32():
  inputs = random_inputs(dtype=jnp.bfloat16)
  # The same values in float32 hash into the same buckets (hashing is in float32).
  wide = [jnp.asarray(np.asarray(x, np.float32)) for x in inputs]
  attention = lsh_function(**CAUSAL_SHARED)
  out, grads = outputs_and_grads(attention, *wide[:3], padding_mask(), wide[3], rotations(8))
  low_out, low_grads = outputs_and_grads(attention, *inputs[:3], padding_mask(), inputs[3],
                                         rotations(8))
  assert low_out.dtype == jnp.bfloat16
  assert relative_error(low_out, out) < 0.03
  for grad, low_grad in zip(grads, low_grads):
    assert low_grad.dtype == jnp.bfloat16
    assert relative_error(low_grad, grad) < 0.05


def test_pmap_matches_one_device():
  devices = jax.local_devices()[:4]
  assert len(devices) == 4
  inputs = [np.asarray(x) for x in random_inputs(batch=4) + (padding_mask(batch=4),)]
  attention = lsh_function(**NON_CAUSAL_SHARED)
  # The same program on two halves of the batch, as the other tests run it.
  q, k, v, cotangent, mask = inputs
  one_device = np.concatenate([
      outputs_and_grads(attention, *[jnp.asarray(x[rows]) for x in (q, k, v, mask, cotangent)],
                        rotations(9))[0]
      for rows in (slice(0, 2), slice(2, 4))])
  split = lambda x: jnp.asarray(x.reshape((4, 1) + x.shape[1:]))
  mapped = jax.pmap(attention, in_axes=(0, 0, 0, 0, None), devices=devices)(
      split(q), split(k), split(v), split(mask), rotations(9))
  np.testing.assert_allclose(np.asarray(mapped).reshape(q.shape), one_device, rtol=1e-6,
                             atol=1e-6)


def test_intermediates_grow_linearly_with_length(monkeypatch):
  # Hashing holds length x n_buckets rotated entries, in blocks of at most
  # _HASH_BLOCK_SIZE: a small cap makes its blocks matter at these lengths.
  monkeypatch.setattr(lsh, '_HASH_BLOCK_SIZE', 1 << 14)

  def largest(length):
    q, k, v, _ = random_inputs(length=length, batch=1)
    loss = lambda q, k, v: jnp.sum(lsh.lsh_attention(
        q, k, v, rotations(0, n_buckets=length // 64), chunk_len=32, n_chunks_after=1))
    return largest_array(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr)

  # Per head and round, the keys are length + 2 chunks and each step's logits
  # one chunk x 3 chunks: doubling the length doubles the largest value
  # (length^2: 4x).
  assert largest(2048) <= 2 * largest(1024)


def test_default_n_buckets():
  assert lsh.default_n_buckets(16384, 128) == 256
  assert lsh.default_n_buckets(1000, 128) == 16
  assert lsh.default_n_buckets(10, 128) == 2


def make(seed=0, **options):
  return ea.make_attention('lsh', rngs=nnx.Rngs(seed), **options)


@nnx.jit
def module_call(module, q, k, v, mask):
  return module(q, k, v, mask, causal=True)


def test_module_registered_with_defaults():
  assert 'lsh' in ea.available_attentions()
  attention = make()
  assert isinstance(attention, lsh.LSHAttention)
  assert (attention.n_hashes, attention.n_buckets, attention.chunk_len,
          attention.shared_qk, attention.n_chunks_after) == (2, None, 128, True, 0)
  assert attention.deterministic is False


def test_module_redraws_rotations_while_training_only():
  q, k, v, _ = random_inputs()
  attention = make(chunk_len=8)  # default n_buckets: 10 for 40 tokens
  call = lambda: module_call(attention, q, k, v, padding_mask())
  first = call()
  assert first.shape == q.shape and first.dtype == q.dtype
  assert np.isfinite(first).all()
  assert not np.allclose(first, call())
  attention.eval()
  assert attention.deterministic is True
  np.testing.assert_array_equal(call(), call())
  attention.train()
  assert not np.allclose(call(), call())


def test_module_rotations_reproducible_from_seed():
  q, k, v, _ = random_inputs()
  first, second, other = (make(seed, chunk_len=8) for seed in (0, 0, 1))
  call = lambda module: module_call(module, q, k, v, padding_mask())
  for _ in range(2):
    np.testing.assert_array_equal(call(first), call(second))
  for module in (first, second, other):
    module.eval()
  np.testing.assert_array_equal(call(first), call(second))
  assert not np.allclose(call(first), call(other))


def test_module_draws_from_attention_stream_before_default():
  key = lambda rngs: lsh.LSHAttention(rngs=rngs).fixed_key[...]
  np.testing.assert_array_equal(key(nnx.Rngs(attention=3, default=0)),
                                key(nnx.Rngs(attention=3, default=1)))
  np.testing.assert_array_equal(key(nnx.Rngs(0)), key(nnx.Rngs(default=0)))
  assert not np.array_equal(key(nnx.Rngs(0)), key(nnx.Rngs(attention=1, default=0)))


@pytest.mark.parametrize('options,message', [
    (dict(n_hashes=0), 'n_hashes'),
    (dict(n_hashes=2.0), 'n_hashes'),
    (dict(n_hashes=True), 'n_hashes'),
    (dict(n_buckets=3), 'n_buckets'),
    (dict(n_buckets=0), 'n_buckets'),
    (dict(n_buckets=-2), 'n_buckets'),
    (dict(chunk_len=0), 'chunk_len'),
    (dict(chunk_len=None), 'chunk_len'),
    (dict(shared_qk='yes'), 'shared_qk'),
    (dict(n_chunks_after=2), 'n_chunks_after'),
    (dict(n_chunks_after=True), 'n_chunks_after'),
    (dict(num_features=4), 'valid options'),
])
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    make(**options)


def test_cross_attention_with_shared_qk_raises():
  q, k, v, _ = random_inputs(length=24, kv_len=LENGTH)
  with pytest.raises(ValueError, match='shared_qk'):
    make()(q, k, v)
  with pytest.raises(ValueError, match='shared_qk'):
    lsh.lsh_attention(q, k, v, one_bucket())


def test_causal_cross_attention_raises():
  q, k, v, _ = random_inputs(length=24, kv_len=LENGTH)
  with pytest.raises(ValueError, match='causal'):
    make(shared_qk=False)(q, k, v, causal=True)
  with pytest.raises(ValueError, match='causal'):
    lsh.lsh_attention(q, k, v, one_bucket(), causal=True, shared_qk=False)


def test_causal_look_forward_raises():
  q, k, v, _ = random_inputs()
  with pytest.raises(ValueError, match='n_chunks_after'):
    make(n_chunks_after=1)(q, k, v, causal=True)
  with pytest.raises(ValueError, match='n_chunks_after'):
    lsh.lsh_attention(q, k, v, one_bucket(), causal=True, n_chunks_after=1)


def test_bad_inputs_raise():
  q, k, v, _ = random_inputs()
  attention = make()
  with pytest.raises(ValueError, match='rank 4'):
    attention(q[0], k, v)
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((BATCH, LENGTH)))
  with pytest.raises(ValueError, match='rotations'):
    lsh.lsh_attention(q, k, v, jnp.zeros((HEADS, 2, DIM + 1, 2)))
