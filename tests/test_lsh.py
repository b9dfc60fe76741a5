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
from efficient_attn.attention import base, lsh
from efficient_attn.attention.full import dense_attention

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


def relative_error(x, y):
  """max |x - y| / max |y| in numpy (eager jnp would compile a program per shape)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  scale = np.max(np.abs(y))
  return np.max(np.abs(x - y)) / scale if scale else np.max(np.abs(x))


# Configurations that several tests share (each compiles once). Non-causal: 6
# chunks a round, loop steps of 2 chunks; causal shared: 5 chunks, steps of 2
# rounds; causal separate: one step.
NON_CAUSAL_SHARED = dict(causal=False, chunk_len=7, shared_qk=True, rows_per_step=14)
CAUSAL_SHARED = dict(causal=True, chunk_len=8, shared_qk=True, rows_per_step=80)
CAUSAL_SEPARATE = dict(causal=True, chunk_len=8, shared_qk=False, rows_per_step=1024)


@functools.cache
def lsh_function(causal=False, chunk_len=8, shared_qk=True, rows_per_step=1024):
  """`lsh_attention` with static options, as a function of (q, k, v, mask, rotations)."""
  return lambda q, k, v, mask, rotations: lsh.lsh_attention(
      q, k, v, rotations, mask, causal, chunk_len, shared_qk, rows_per_step=rows_per_step)


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


hash_buckets = jax.jit(lsh.hash_buckets)


def lsh_visibility(q, k, mask, rotations, causal, chunk_len, shared_qk):
  """Which keys each query sees per round, from LSH's definition: bool `[b, h, rounds, n, n]`.

  Query i sees key j in a round iff their chunks after sorting by (bucket,
  position) are the same or neighbours (the one before, and after unless
  causal), j is not padding, and j <= i when causal. Padding keys get bucket
  n_buckets, after all others.
  """
  batch, length, heads, dim = q.shape
  chunks = lsh.num_chunks(length, length, chunk_len)
  chunk = -(-length // chunks)
  mask = np.asarray(mask)

  def chunk_of_each_token(x, tokens_valid):
    rows = np.zeros((batch, heads, chunks * chunk, dim), np.float32)
    rows[:, :, :length] = np.asarray(x).transpose(0, 2, 1, 3)
    valid = np.zeros((batch, chunks * chunk), bool)
    valid[:, :length] = tokens_valid
    buckets = np.asarray(hash_buckets(jnp.asarray(rows), rotations))
    buckets = np.where(valid[:, None, None, :], buckets, max(1, 2 * rotations.shape[-1]))
    rank = np.argsort(np.argsort(buckets, axis=-1, kind='stable'), axis=-1)
    return rank[..., :length] // chunk

  q_chunk = chunk_of_each_token(q, mask if shared_qk else np.ones_like(mask))
  k_chunk = q_chunk if shared_qk else chunk_of_each_token(k, mask)
  distance = (q_chunk[..., :, None] - k_chunk[..., None, :]) % chunks
  visible = (distance == 0) | (distance == 1 % chunks)
  if not causal:
    visible |= distance == -1 % chunks
  visible &= mask[:, None, None, None, :]
  if causal:
    visible &= np.tril(np.ones((length, length), bool))
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
      scores = jnp.where(visible & jnp.eye(length, dtype=bool), lsh.SELF_VALUE, scores)
    lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    out = jnp.einsum('bhrqk,bkhd->bhrqd', jnp.exp(scores - lse), v)
    out = jnp.where(lse > 0.75 * base.MASK_VALUE, out, 0.0)
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


@pytest.mark.parametrize('options', [
    NON_CAUSAL_SHARED,
    CAUSAL_SHARED,
    CAUSAL_SEPARATE,
    dict(causal=False, chunk_len=20, shared_qk=False, rows_per_step=1024),  # 2 chunks
])
def test_hashed_chunks_match_dense_oracle(options):
  q, k, v, cotangent = inputs = random_inputs()
  rotation = rotations(options['chunk_len'])
  visibility = lambda mask: lsh_visibility(q, k, mask, rotation, options['causal'],
                                           options['chunk_len'], options['shared_qk'])
  assert_close(lsh_function(**options), lsh_reference_function(options['shared_qk']), inputs,
               [padding_mask()], rotation, 1e-5, reference_extra=visibility)


def test_hash_buckets_are_argmax_of_rotated_and_negated():
  x = random_inputs()[0].transpose(0, 2, 1, 3)
  rotation = rotations(0, n_hashes=3, n_buckets=8)
  rotated = np.einsum('bhnd,hrdk->bhrnk', np.asarray(x, np.float64), np.asarray(rotation))
  expected = np.argmax(np.concatenate([rotated, -rotated], axis=-1), axis=-1)
  np.testing.assert_array_equal(hash_buckets(x, rotation), expected)
  assert np.max(hash_buckets(x, one_bucket())) == 0


def test_hash_buckets_in_blocks_of_rows(monkeypatch):
  x = random_inputs()[0].transpose(0, 2, 1, 3)
  rotation = rotations(0, n_hashes=3, n_buckets=8)
  monkeypatch.setattr(lsh, '_HASH_BLOCK_SIZE', 7 * HEADS * 3 * 4)  # blocks of 7 rows
  in_blocks = jax.jit(lambda x, rotation: lsh.hash_buckets(x, rotation))(x, rotation)
  np.testing.assert_array_equal(in_blocks, hash_buckets(x, rotation))


def test_cross_attention_one_bucket_is_exact_attention():
  attention = lsh_function(chunk_len=LENGTH, shared_qk=False)
  inputs = random_inputs(length=24, kv_len=LENGTH)
  assert_close(attention, dense_function(False), inputs, [padding_mask()], one_bucket(), 1e-5)


def test_cross_attention_with_hashing_is_finite():
  q, k, v, _ = random_inputs(length=24, kv_len=LENGTH)
  out = jax.jit(lsh_function(shared_qk=False))(q, k, v, padding_mask(), rotations(0))
  assert out.shape == q.shape
  assert np.isfinite(out).all()


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


@pytest.mark.parametrize('options', [NON_CAUSAL_SHARED, CAUSAL_SEPARATE])
def test_padded_keys_and_values_change_nothing(options):
  q, k, v, cotangent = random_inputs()
  mask = padding_mask()
  attention = lsh_function(**options)
  hidden = ~np.asarray(mask)[:, :, None, None]
  noise_k, noise_v, _, _ = random_inputs(seed=6)
  out, _ = outputs_and_grads(attention, q, k, v, mask, cotangent, rotations(5))
  changed, _ = outputs_and_grads(attention, q, jnp.asarray(np.where(hidden, noise_k, k)),
                                 jnp.asarray(np.where(hidden, noise_v, v)), mask, cotangent,
                                 rotations(5))
  np.testing.assert_array_equal(out, changed)


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


def largest_intermediate(jaxpr):
  """Most elements of any value computed in `jaxpr`, inner jaxprs included."""
  sizes = [0]
  for eqn in jaxpr.eqns:
    sizes += [math.prod(getattr(var.aval, 'shape', ())) for var in eqn.outvars]
    for param in eqn.params.values():
      for inner in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(inner, 'jaxpr', inner)
        if isinstance(inner, jax.extend.core.Jaxpr):
          sizes.append(largest_intermediate(inner))
  return max(sizes)


def test_no_length_squared_intermediate():
  length = 1024
  q, k, v, _ = random_inputs(length=length, batch=1)
  loss = lambda q, k, v: jnp.sum(lsh.lsh_attention(q, k, v, rotations(0, n_buckets=16),
                                                   chunk_len=32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr
  # Per head and round, logits are length x 3 chunks; length^2 would be 1M.
  assert largest_intermediate(jaxpr) < length * length // 8


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
          attention.shared_qk) == (2, None, 128, True)
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


def test_bad_inputs_raise():
  q, k, v, _ = random_inputs()
  attention = make()
  with pytest.raises(ValueError, match='rank 4'):
    attention(q[0], k, v)
  with pytest.raises(ValueError, match='mask'):
    attention(q, k, v, mask=jnp.ones((BATCH, LENGTH)))
  with pytest.raises(ValueError, match='rotations'):
    lsh.lsh_attention(q, k, v, jnp.zeros((HEADS, 2, DIM + 1, 2)))
