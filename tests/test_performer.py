"""Tests of the Performer (FAVOR+) attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.attention import base, performer
from helpers import relative_error

# The tests are bound by compilation: compile with less optimisation, and share
# one jitted entry point so that tests with equal shapes share programs.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
favor = jit(performer.favor_attention,
            static_argnames=('causal', 'kernel', 'chunk_len', 'block_len'))
BATCH, LENGTH, HEADS, HEAD_DIM, NUM_FEATURES, CHUNK = 2, 24, 2, 8, 20, 8
ALL_KEYS = jnp.ones((BATCH, LENGTH), bool)


def _qkv(seed, batch=BATCH, length=LENGTH, scale=0.5, dtype=jnp.float32):
  q, k, v = np.random.default_rng(seed).standard_normal((3, batch, length, HEADS, HEAD_DIM))
  return (jnp.asarray(scale * q, dtype), jnp.asarray(scale * k, dtype),
          jnp.asarray(v, dtype))


def _features(seed, num_features=NUM_FEATURES):
  return performer.draw_orthogonal_features(jax.random.key(seed), num_features, HEAD_DIM)


def _attend(q, k, v, features, mask=ALL_KEYS, causal=False):
  """FAVOR+ over several chunks and blocks (length 24 in blocks of 8)."""
  return favor(q, k, v, features, mask, causal, chunk_len=CHUNK, block_len=CHUNK)


@functools.partial(jit, static_argnames='causal')
def _jitted_grads(q, k, v, features, mask, causal):
  loss = lambda q, k, v: jnp.sum(performer.favor_attention(
      q, k, v, features, mask, causal, chunk_len=CHUNK, block_len=CHUNK) ** 2)
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _grads(q, k, v, features, mask=ALL_KEYS, causal=False):
  """Gradients of sum(out^2) with respect to q, k and v."""
  return _jitted_grads(q, k, v, features, mask, causal)


@functools.partial(jit, static_argnames=('causal', 'kernel'))
def _naive_favor(q, k, v, features, mask, causal=False, kernel='softmax'):
  """FAVOR+ with the matrix phi(Q) phi(K)^T materialised, same stabilisers."""
  scale = q.shape[-1]**-0.25
  q, k = q * scale, k * scale
  valid = mask[:, :, None, None]
  exponent = jnp.where(valid, performer.softmax_exponent(k, features), -jnp.inf)
  key_max = jnp.max(exponent, axis=(1, 3), keepdims=True)
  phi_q = performer.random_features(q, features, kernel, subtract_row_max=True)
  phi_k = performer.random_features(k, features, kernel, shift=key_max, valid=valid)
  weights = jnp.einsum('bqhm,bkhm->bhqk', phi_q, phi_k)
  if causal:
    weights = jnp.tril(weights)
  out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
  return out / jnp.sum(weights, axis=-1).transpose(0, 2, 1)[..., None]


def test_features_are_orthogonal_blocks_with_chi_norms():
  features = _features(0)
  assert features.shape == (NUM_FEATURES, HEAD_DIM) and features.dtype == jnp.float32
  directions = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
  for start in range(0, NUM_FEATURES, HEAD_DIM):
    block = directions[start:start + HEAD_DIM]
    np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=1e-5)
  # Row norms are chi draws, not all equal.
  assert float(jnp.std(jnp.linalg.norm(features, axis=-1))) > 0.1


def test_orthonormal_factor_is_the_qr_factor_with_positive_diagonal():
  matrices = np.random.default_rng(0).standard_normal((3, HEAD_DIM, HEAD_DIM))
  q, r = np.linalg.qr(matrices)
  want = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  got = performer.orthonormal_factor(jnp.asarray(matrices, jnp.float32))
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_softmax_kernel_estimate_is_unbiased():
  num_seeds = 4000

  @jit
  def estimates(x, y):
    def one_draw(key):
      features = performer.draw_orthogonal_features(key, NUM_FEATURES, HEAD_DIM)
      return performer.random_features(x, features) @ performer.random_features(y, features)
    return jax.vmap(one_draw)(jax.random.split(jax.random.key(2), num_seeds))

  points = 0.4 * np.random.default_rng(1).standard_normal((3, 2, HEAD_DIM), np.float32)
  for x, y in points:
    samples = estimates(x, y)
    # Draws are independent, so their mean has standard error std / sqrt(S).
    standard_error = float(jnp.std(samples)) / np.sqrt(num_seeds)
    exact = float(np.exp(x @ y))
    assert abs(float(jnp.mean(samples)) - exact) < 4.5 * standard_error, (exact, standard_error)


def test_error_against_exact_attention_falls_with_num_features():
  q, k, v = _qkv(3)
  exact = ea.dense_attention(q, k, v)
  errors = []
  for num_features in (64, 256, 1024):
    runs = [_attend(q, k, v, _features(seed, num_features)) for seed in range(4)]
    errors.append(np.mean([float(jnp.mean(jnp.abs(out - exact))) for out in runs]))
  # The error falls like 1/sqrt(num_features): about 2x per step.
  assert errors[0] > 1.3 * errors[1] > 1.3**2 * errors[2], errors
  assert errors[2] < 0.1 * float(jnp.mean(jnp.abs(exact)))


@pytest.mark.parametrize('kernel,causal,length,chunk_len', [
    ('softmax', False, 29, 8), ('softmax', True, 29, 8), ('relu', False, 29, 8),
    ('relu', True, 29, 8), ('softmax', True, 24, 64)])
def test_chunked_equals_naive_favor(kernel, causal, length, chunk_len):
  q, k, v = _qkv(4, length=length)
  mask = jnp.arange(length)[None, :] < jnp.array([[length], [length - 5]])
  features = _features(5)
  out = favor(q, k, v, features, mask, causal, kernel, chunk_len=chunk_len,
              block_len=chunk_len)
  reference = _naive_favor(q, k, v, features, mask, causal, kernel)
  assert relative_error(out, reference) < 1e-5


def test_noncausal_allows_different_query_and_key_lengths():
  q, _, _ = _qkv(6, length=10)
  _, k, v = _qkv(7, length=27)
  features = _features(8)
  out = favor(q, k, v, features, block_len=CHUNK)
  assert out.shape == q.shape
  reference = _naive_favor(q, k, v, features, jnp.ones((BATCH, 27), bool))
  assert relative_error(out, reference) < 1e-5


@pytest.mark.parametrize('causal', [False, True])
def test_stabilisers_keep_large_inputs_finite(causal):
  q, k, v = _qkv(9, scale=30.0)
  features = _features(10)
  assert bool(jnp.all(jnp.isfinite(_attend(q, k, v, features, causal=causal))))
  for grad in _grads(q, k, v, features, causal=causal):
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_causal_gradient_to_future_keys_and_values_is_zero():
  q, k, v = _qkv(11, length=19)
  features = _features(12)

  @jit
  def grads(position):
    def loss(k, v):
      out = performer.favor_attention(q, k, v, features, causal=True, chunk_len=CHUNK)
      seen = jnp.arange(out.shape[1]) <= position
      return jnp.sum(jnp.where(seen[None, :, None, None], out, 0.0) ** 2)
    return jax.grad(loss, argnums=(0, 1))(k, v)

  for position in (0, 7, 8, 13):
    grad_k, grad_v = grads(position)
    assert bool(jnp.all(grad_k[:, position + 1:] == 0))
    assert bool(jnp.all(grad_v[:, position + 1:] == 0))
    assert bool(jnp.all(jnp.any(grad_v[:, :position + 1] != 0, axis=(2, 3))))


@pytest.mark.parametrize('causal', [False, True])
def test_padding_keys_do_not_change_outputs(causal):
  q, k, v = _qkv(13)
  mask = ALL_KEYS.at[0, 5:9].set(False).at[1, 20:].set(False)
  noise_k, noise_v = 10.0 * np.random.default_rng(14).standard_normal((2,) + k.shape)
  k2 = jnp.where(mask[:, :, None, None], k, noise_k)
  v2 = jnp.where(mask[:, :, None, None], v, noise_v)
  features = _features(15)
  np.testing.assert_allclose(_attend(q, k, v, features, mask, causal),
                             _attend(q, k2, v2, features, mask, causal), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('causal', [False, True])
def test_queries_without_visible_keys_give_zeros_and_finite_gradients(causal):
  q, k, v = _qkv(16)
  # Batch 0 sees no key at all; in batch 1 the first 6 keys are padding, so
  # causal queries 0..5 see no key either.
  mask = ALL_KEYS.at[0].set(False).at[1, :6].set(False)
  features = _features(17)
  out = _attend(q, k, v, features, mask, causal)
  assert bool(jnp.all(out[0] == 0))
  if causal:
    assert bool(jnp.all(out[1, :6] == 0)) and bool(jnp.all(out[1, 6:] != 0))
  for grad in _grads(q, k, v, features, mask, causal):
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert bool(jnp.all(grad[0] == 0))


@pytest.mark.parametrize('causal', [False, True])
def test_bfloat16_matches_float32(causal):
  q, k, v = _qkv(18, dtype=jnp.bfloat16)
  features = _features(19)
  out = _attend(q, k, v, features, causal=causal)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  reference = _attend(*(x.astype(jnp.float32) for x in (q, k, v)), features, causal=causal)
  np.testing.assert_allclose(out.astype(jnp.float32), reference, atol=0.05)
  if causal:
    for grad in _grads(q, k, v, features, causal=causal):
      assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad)))


def test_pmap_over_devices_matches_one_device():
  assert jax.device_count() == 4
  q, k, v = _qkv(22, batch=4)
  mask = jnp.ones((4, LENGTH), bool).at[1, 10:].set(False)
  features = _features(23)

  def both(q, k, v, mask):
    return [performer.favor_attention(q, k, v, features, mask, causal, chunk_len=CHUNK,
                                      block_len=CHUNK) for causal in (False, True)]

  split = lambda x: x.reshape((4, 1) + x.shape[1:])
  sharded = jax.pmap(both)(split(q), split(k), split(v), split(mask))
  for out, reference in zip(sharded, jit(both)(q, k, v, mask)):
    np.testing.assert_allclose(out.reshape(q.shape), reference, rtol=1e-5, atol=1e-6)


@functools.partial(jit, static_argnames=('graphdef', 'causal'))
def _jitted_call(graphdef, state, q, k, v, causal):
  attn = nnx.merge(graphdef, state)
  return attn(q, k, v, causal=causal), nnx.state(attn)


def _call(attn, q, k, v, causal=False):
  """attn(q, k, v) under jit, keeping the module's random state up to date."""
  out, state = _jitted_call(*nnx.split(attn), q, k, v, causal)
  nnx.update(attn, state)
  return out


def _make(rngs, **options):
  return ea.make_attention('performer', num_features=NUM_FEATURES, chunk_len=CHUNK,
                           block_len=CHUNK, rngs=rngs, **options)


def test_module_matches_pure_function():
  q, k, v = _qkv(24)
  attn = _make(nnx.Rngs(0))
  assert isinstance(attn.fixed_key, base.RandomState)
  features = attn.features(HEAD_DIM)
  for causal in (False, True):
    np.testing.assert_allclose(_call(attn, q, k, v, causal),
                               _attend(q, k, v, features, causal=causal), rtol=1e-5, atol=1e-6)


def test_fixed_features_are_reproducible_from_the_seed():
  q, k, v = _qkv(25)
  attn = _make(nnx.Rngs(0))
  out = _call(attn, q, k, v)
  np.testing.assert_array_equal(out, _call(attn, q, k, v))
  np.testing.assert_array_equal(out, _call(_make(nnx.Rngs(0)), q, k, v))
  assert not np.allclose(out, _call(_make(nnx.Rngs(1)), q, k, v))
  # The 'attention' stream is used when present.
  assert not np.allclose(out, _call(_make(nnx.Rngs(0, attention=1)), q, k, v))


def test_every_call_redraws_in_training_only():
  q, k, v = _qkv(26)
  attn = _make(nnx.Rngs(attention=3), redraw='every_call')
  assert not np.allclose(_call(attn, q, k, v), _call(attn, q, k, v))
  attn.eval()
  fixed = _call(attn, q, k, v)
  np.testing.assert_array_equal(fixed, _call(attn, q, k, v))
  np.testing.assert_allclose(fixed, _attend(q, k, v, attn.features(HEAD_DIM)), rtol=1e-4,
                             atol=1e-6)
  attn.train()
  assert not np.allclose(_call(attn, q, k, v), fixed)


@pytest.mark.parametrize('options,message', [
    ({'num_features': 0}, 'num_features'),
    ({'num_features': 2.5}, 'num_features'),
    ({'num_features': True}, 'num_features'),
    ({'kernel': 'cosine'}, "kernel='cosine' is not supported; allowed: 'softmax', 'relu'"),
    ({'redraw': 'sometimes'}, "redraw='sometimes' is not supported; allowed: 'fixed', 'every_call'"),
    ({'chunk_len': -4}, 'chunk_len'),
    ({'block_len': 0}, 'block_len'),
    ({'head_dim': 8}, 'valid options'),
])
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    ea.make_attention('performer', rngs=nnx.Rngs(0), **options)


def test_bad_inputs_raise():
  attn = _make(nnx.Rngs(0))
  q, k, v = _qkv(27)
  _, k_long, v_long = _qkv(28, length=30)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    attn(q, k_long, v_long, causal=True)
  with pytest.raises(ValueError, match='rank 4'):
    attn(q[0], k, v)
  with pytest.raises(ValueError, match='mask must be a bool'):
    attn(q, k, v, mask=jnp.ones((BATCH, LENGTH)))
  with pytest.raises(ValueError, match='mask must have shape'):
    attn(q, k, v, mask=jnp.ones((BATCH, LENGTH - 1), bool))
  with pytest.raises(ValueError, match='share one dtype'):
    attn(q, k.astype(jnp.bfloat16), v)
