"""Tests of the 'lsh' attention against exact attention and a dense LSH oracle."""

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
  """q, k, v and an output cotangent, standard normal."""
  kv_len = length if kv_len is None else kv_len
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, HEADS, DIM), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, HEADS, DIM), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, HEADS, DIM), dtype)
  cotangent = jax.random.normal(keys[3], (batch, length, HEADS, DIM), dtype)
  return q, k, v, cotangent


def padding_mask(batch=BATCH, length=LENGTH, seed=1):
  """A random key mask with about 30% padding, position 0 of row 0 padded."""
  mask = jax.random.uniform(jax.random.key(seed), (batch, length)) > 0.3
  return mask.at[0, 0].set(False)


def one_bucket(n_hashes=2):
  """Rotations that put every token into one bucket (no hashing)."""
  return jnp.zeros((HEADS, n_hashes, DIM, 0), jnp.float32)


def relative_error(x, y):
  scale = float(jnp.max(jnp.abs(y)))
  return float(jnp.max(jnp.abs(x - y))) / scale if scale else float(jnp.max(jnp.abs(x)))


@functools.partial(jax.jit, static_argnums=0)
def outputs_and_grads(attention, q, k, v, mask, cotangent):
  """attention(q, k, v, mask) and the gradients of <attention(...), cotangent> w.r.t. q, k, v."""

  def loss(q, k, v):
    out = attention(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grads, out = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def assert_close(attention, reference, inputs, masks, tolerance):
  """Outputs and gradients w.r.t. q, k, v agree within a relative `tolerance`, per mask."""
  q, k, v, cotangent = inputs
  for mask in masks:
    out, grads = outputs_and_grads(attention, q, k, v, mask, cotangent)
    ref_out, ref_grads = outputs_and_grads(reference, q, k, v, mask, cotangent)
    assert relative_error(out, ref_out) <= tolerance
    for grad, ref_grad in zip(grads, ref_grads):
      assert relative_error(grad, ref_grad) <= tolerance


def lsh_with(**options):
  """`lsh_attention(q, k, v, mask=mask, **options)` as a function of (q, k, v, mask)."""
  return lambda q, k, v, mask: lsh.lsh_attention(q, k, v, mask=mask, **options)


NO_PADDING = jnp.ones((BATCH, LENGTH), bool)


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


def lsh_reference(q, k, v, rotations, mask, causal, chunk_len, shared_qk):
  """LSH attention from its definition, with dense [length, length] masks per round.

  Query i sees key j in a round iff their chunks after sorting by (bucket,
  position) are equal or neighbours (the one before, and after unless causal).
  """
  batch, length, _, dim = q.shape
  n_buckets = max(1, 2 * rotations.shape[-1])
  chunks = lsh.num_chunks(length, length, chunk_len)
  chunk = -(-length // chunks)
  valid = base.key_mask_or_ones(mask, batch, length)
  if shared_qk:
    k = unit(q)

  def chunk_of_each_token(x, tokens_valid):
    rows = base.pad_axis(x, 1, chunk).transpose(0, 2, 1, 3)
    buckets = lsh.hash_buckets(rows, rotations)
    tokens_valid = base.pad_axis(tokens_valid, 1, chunks * chunk, False)
    buckets = jnp.where(tokens_valid[:, None, None, :], buckets, n_buckets)
    rank = jnp.argsort(jnp.argsort(buckets, axis=-1, stable=True), axis=-1)
    return (rank // chunk)[..., :length]

  q_chunk = chunk_of_each_token(q, valid if shared_qk else jnp.ones_like(valid))
  k_chunk = q_chunk if shared_qk else chunk_of_each_token(k, valid)
  distance = (q_chunk[..., :, None] - k_chunk[..., None, :]) % chunks
  visible = (distance == 0) | (distance == 1 % chunks)
  if not causal:
    visible = visible | (distance == -1 % chunks)
  visible = visible & valid[:, None, None, None, :]
  if causal:
    visible = visible & jnp.tril(jnp.ones((length, length), bool))
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k)[:, :, None] / np.sqrt(dim)
  scores = jnp.where(visible, scores, base.MASK_VALUE)
  if shared_qk:
    scores = jnp.where(visible & jnp.eye(length, dtype=bool), lsh.SELF_VALUE, scores)
  lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
  out = jnp.einsum('bhrqk,bkhd->bhrqd', jnp.exp(scores - lse), v)
  out = jnp.where(lse > 0.75 * base.MASK_VALUE, out, 0.0)
  out = jnp.sum(out * jax.nn.softmax(lse, axis=2), axis=2)
  return out.transpose(0, 2, 1, 3)


@pytest.mark.parametrize('causal', [False, True])
def test_one_bucket_one_chunk_is_exact_attention(causal):
  attention = lsh_with(rotations=one_bucket(), causal=causal, chunk_len=LENGTH, shared_qk=False)
  reference = lambda q, k, v, mask: dense_attention(q, k, v, mask, causal)
  assert_close(attention, reference, random_inputs(), [NO_PADDING, padding_mask()], 1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_shared_qk_attends_to_unit_queries_and_not_itself(causal):
  attention = lsh_with(rotations=one_bucket(), causal=causal, chunk_len=64, shared_qk=True)
  reference = lambda q, k, v, mask: shared_qk_reference(q, v, mask, causal)
  assert_close(attention, reference, random_inputs(), [NO_PADDING, padding_mask()], 1e-5)


@pytest.mark.parametrize('chunk_len,n_buckets,group_rows,causal,shared_qk', [
    (7, 8, 1024, False, True),
    (7, 4, 14, True, False),
    (16, 4, 16, False, False),
    (9, 8, 9, True, True),
    (25, 2, 1024, False, True),
])
def test_hashed_chunks_match_dense_oracle(monkeypatch, chunk_len, n_buckets, group_rows, causal,
                                          shared_qk):
  # Small loop steps exercise the gradient of keys shared by neighbouring steps.
  monkeypatch.setattr(lsh, '_GROUP_ROWS', group_rows)
  rotations = lsh.draw_rotations(jax.random.key(chunk_len), HEADS, 3, DIM, n_buckets)
  options = dict(rotations=rotations, causal=causal, chunk_len=chunk_len, shared_qk=shared_qk)
  reference = lambda q, k, v, mask: lsh_reference(q, k, v, mask=mask, **options)
  assert_close(lsh_with(**options), reference, random_inputs(), [padding_mask()], 1e-5)


def test_cross_attention_one_bucket_is_exact_attention():
  inputs = random_inputs(length=24, kv_len=LENGTH)
  attention = lsh_with(rotations=one_bucket(), chunk_len=64, shared_qk=False)
  assert_close(attention, dense_attention, inputs, [padding_mask()], 1e-5)


def test_cross_attention_with_hashing_is_finite():
  q, k, v, _ = random_inputs(length=24, kv_len=LENGTH)
  rotations = lsh.draw_rotations(jax.random.key(0), HEADS, 2, DIM, 4)
  out = jax.jit(lsh_with(rotations=rotations, chunk_len=8, shared_qk=False))(
      q, k, v, padding_mask())
  assert out.shape == q.shape
  assert bool(jnp.isfinite(out).all())


def test_rounds_with_identical_rotations_equal_one_round():
  rotations = lsh.draw_rotations(jax.random.key(3), HEADS, 1, DIM, 8)
  twice = jnp.concatenate([rotations, rotations], axis=1)
  one_round = lsh_with(rotations=rotations, chunk_len=8)
  two_rounds = lsh_with(rotations=twice, chunk_len=8)
  assert_close(two_rounds, one_round, random_inputs(), [padding_mask()], 1e-6)


@pytest.mark.parametrize('shared_qk', [False, True])
def test_causal_outputs_ignore_later_keys_and_values(shared_qk):
  q, k, v, cotangent = random_inputs()
  rotations = lsh.draw_rotations(jax.random.key(4), HEADS, 2, DIM, 4)
  attention = lsh_with(rotations=rotations, causal=True, chunk_len=8, shared_qk=shared_qk)
  positions = jnp.arange(LENGTH)[None, :, None, None]
  for i in (0, 13, LENGTH - 2):
    # Only outputs at positions <= i enter the loss.
    _, grads = outputs_and_grads(attention, q, k, v, padding_mask(),
                                 jnp.where(positions <= i, cotangent, 0.0))
    for grad in grads:
      assert bool(jnp.all(grad[:, i + 1:] == 0))


@pytest.mark.parametrize('shared_qk,causal', [(False, True), (True, False)])
def test_padded_keys_and_values_change_nothing(shared_qk, causal):
  q, k, v, _ = random_inputs()
  mask = padding_mask()
  rotations = lsh.draw_rotations(jax.random.key(5), HEADS, 2, DIM, 4)
  attention = jax.jit(lsh_with(rotations=rotations, causal=causal, chunk_len=8,
                               shared_qk=shared_qk))
  hidden = ~mask[:, :, None, None]
  noise_k, noise_v = jax.random.normal(jax.random.key(6), (2,) + k.shape) * 100
  out = attention(q, k, v, mask)
  changed = attention(q, jnp.where(hidden, noise_k, k), jnp.where(hidden, noise_v, v), mask)
  np.testing.assert_array_equal(out, changed)


@pytest.mark.parametrize('shared_qk', [False, True])
def test_query_without_visible_key_is_zero_without_nan(shared_qk):
  q, k, v, cotangent = random_inputs()
  mask = padding_mask().at[1].set(False)  # row 1: no real key at all
  rotations = lsh.draw_rotations(jax.random.key(7), HEADS, 2, DIM, 4)
  attention = lsh_with(rotations=rotations, causal=True, chunk_len=8, shared_qk=shared_qk)
  out, grads = outputs_and_grads(attention, q, k, v, mask, cotangent)
  assert bool(jnp.all(out[1] == 0))
  assert bool(jnp.all(out[0, 0] == 0))  # causal, and key 0 of row 0 is padding
  for x in (out,) + tuple(grads):
    assert bool(jnp.isfinite(x).all())


def test_bfloat16_close_to_float32():
  q, k, v, cotangent = random_inputs()
  # One bucket: hashing rounded inputs could otherwise move tokens between chunks.
  attention = lsh_with(rotations=one_bucket(), chunk_len=16, shared_qk=False)
  out, grads = outputs_and_grads(attention, q, k, v, padding_mask(), cotangent)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  low_out, low_grads = outputs_and_grads(attention, *low, padding_mask(), cotangent)
  assert low_out.dtype == jnp.bfloat16
  assert relative_error(low_out.astype(jnp.float32), out) < 0.03
  for grad, low_grad in zip(grads, low_grads):
    assert low_grad.dtype == jnp.bfloat16
    assert relative_error(low_grad.astype(jnp.float32), grad) < 0.05


def test_bfloat16_with_hashing_is_finite():
  q, k, v, cotangent = random_inputs(dtype=jnp.bfloat16)
  rotations = lsh.draw_rotations(jax.random.key(8), HEADS, 2, DIM, 4)
  attention = lsh_with(rotations=rotations, causal=True, chunk_len=8)
  out, grads = outputs_and_grads(attention, q, k, v, padding_mask(), cotangent)
  for x in (out,) + tuple(grads):
    assert x.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(x.astype(jnp.float32)).all())


def test_pmap_matches_one_device():
  devices = jax.local_devices()[:4]
  assert len(devices) == 4
  q, k, v, _ = random_inputs(batch=4)
  mask = padding_mask(batch=4)
  rotations = lsh.draw_rotations(jax.random.key(9), HEADS, 2, DIM, 4)
  attention = lsh_with(rotations=rotations, chunk_len=8)
  one_device = jax.jit(attention)(q, k, v, mask)
  split = lambda x: x.reshape((4, 1) + x.shape[1:])
  mapped = jax.pmap(attention, devices=devices)(split(q), split(k), split(v), split(mask))
  np.testing.assert_allclose(mapped.reshape(q.shape), one_device, rtol=1e-6, atol=1e-6)


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
  rotations = lsh.draw_rotations(jax.random.key(0), HEADS, 2, DIM, 16)
  loss = lambda q, k, v: jnp.sum(lsh.lsh_attention(q, k, v, rotations, chunk_len=32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr
  # Per head and round, logits are length x 3 chunks; length^2 would be 1M.
  assert largest_intermediate(jaxpr) < length * length // 8


def test_default_n_buckets():
  assert lsh.default_n_buckets(16384, 128) == 256
  assert lsh.default_n_buckets(1000, 128) == 16
  assert lsh.default_n_buckets(10, 128) == 2


def make(**options):
  return ea.make_attention('lsh', rngs=nnx.Rngs(0), **options)


def test_module_registered_with_defaults():
  assert 'lsh' in ea.available_attentions()
  attention = make()
  assert (attention.n_hashes, attention.n_buckets, attention.chunk_len,
          attention.shared_qk) == (2, None, 128, True)
  assert attention.deterministic is False
  q, k, v, _ = random_inputs()
  out = attention(q, k, v, padding_mask(), causal=True)
  assert out.shape == q.shape and out.dtype == q.dtype


def test_module_redraws_rotations_while_training_only():
  q, k, v, _ = random_inputs()
  attention = make(n_buckets=8, chunk_len=8)
  first, second = attention(q, k, v), attention(q, k, v)
  assert not np.allclose(first, second)
  attention.eval()
  assert attention.deterministic is True
  np.testing.assert_array_equal(attention(q, k, v), attention(q, k, v))
  attention.train()
  assert not np.allclose(attention(q, k, v), attention(q, k, v))


def test_module_rotations_reproducible_from_seed():
  q, k, v, _ = random_inputs()
  first, second = make(n_buckets=8, chunk_len=8), make(n_buckets=8, chunk_len=8)
  for _ in range(2):
    np.testing.assert_array_equal(first(q, k, v), second(q, k, v))
  other = ea.make_attention('lsh', n_buckets=8, chunk_len=8, rngs=nnx.Rngs(1))
  for module in (first, second, other):
    module.eval()
  np.testing.assert_array_equal(first(q, k, v), second(q, k, v))
  assert not np.allclose(first(q, k, v), other(q, k, v))


def test_module_uses_attention_stream_before_default():
  q, k, v, _ = random_inputs()
  options = dict(n_buckets=8, chunk_len=8, rngs=None)
  by_stream = lambda rngs: ea.make_attention('lsh', **{**options, 'rngs': rngs})(q, k, v)
  np.testing.assert_array_equal(by_stream(nnx.Rngs(attention=3, default=0)),
                                by_stream(nnx.Rngs(attention=3, default=1)))
  np.testing.assert_array_equal(by_stream(nnx.Rngs(0)), by_stream(nnx.Rngs(default=0)))


def test_module_redraws_under_nnx_jit():
  q, k, v, _ = random_inputs()
  attention = make(n_buckets=8, chunk_len=8)
  call = nnx.jit(lambda module, q, k, v: module(q, k, v))
  assert not np.allclose(call(attention, q, k, v), call(attention, q, k, v))
  attention.eval()
  np.testing.assert_array_equal(call(attention, q, k, v), call(attention, q, k, v))


def test_module_one_bucket_is_exact_attention():
  q, k, v, _ = random_inputs()
  attention = make(n_buckets=1, chunk_len=64, shared_qk=False)
  expected = dense_attention(q, k, v, padding_mask(), causal=True)
  assert relative_error(attention(q, k, v, padding_mask(), causal=True), expected) <= 1e-5


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
  q, k, v, _ = random_inputs(length=24, kv_len=40)
  with pytest.raises(ValueError, match='shared_qk'):
    make()(q, k, v)
  with pytest.raises(ValueError, match='shared_qk'):
    lsh.lsh_attention(q, k, v, one_bucket())


def test_causal_cross_attention_raises():
  q, k, v, _ = random_inputs(length=24, kv_len=40)
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
