"""Tests of the Linformer attention: the identity limit, padding, sharing, dtypes, transforms, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn.attention as attention
from efficient_attn.attention.full import dense_attention
from efficient_attn.attention.linformer import LinformerAttention, linformer_attention
from helpers import relative_error

BATCH, HEADS, HEAD_DIM = 2, 2, 8


def make_qkv(q_len, kv_len, dtype=jnp.float32, seed=0, heads=HEADS):
  """Random q, k, v in the shared layout."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((BATCH, q_len, heads, HEAD_DIM))
  k = rng.standard_normal((BATCH, kv_len, heads, HEAD_DIM))
  v = rng.standard_normal((BATCH, kv_len, heads, HEAD_DIM))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def padding_mask(kv_len, real_lengths):
  """Bool `[batch, kv_len]` with the first `real_lengths[b]` keys real."""
  return jnp.arange(kv_len)[None, :] < jnp.asarray(real_lengths)[:, None]


def with_grads(fn):
  """Jitted (q, k, v) -> fn(q, k, v) and its gradients w.r.t. q, k, v for a fixed cotangent."""

  def run(q, k, v):
    out, pullback = jax.vjp(fn, q, k, v)
    cotangent = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return (out,) + pullback(cotangent.astype(out.dtype))

  return jax.jit(run)


def set_identity(attn, max_len):
  """Sets E (and F) to the identity, so the projection keeps every key."""
  eye = jnp.eye(attn.k, max_len)
  if attn.per_head:
    eye = jnp.broadcast_to(eye, (attn.num_heads,) + eye.shape)
  attn.key_projection[...] = eye
  if attn.value_projection is not None:
    attn.value_projection[...] = eye


@pytest.mark.parametrize('per_head, kv_len, masked', [
    (False, 16, False), (False, 11, True), (True, 16, True)])
def test_identity_projection_equals_exact_attention(per_head, kv_len, masked):
  max_len = 16
  attn = LinformerAttention(max_len=max_len, k=max_len, per_head=per_head,
                            num_heads=HEADS, rngs=nnx.Rngs(0))
  set_identity(attn, max_len)
  q, k, v = make_qkv(12, kv_len)
  mask = padding_mask(kv_len, [kv_len - 3, 5]) if masked else None
  got = with_grads(lambda q, k, v: attn(q, k, v, mask))(q, k, v)
  want = with_grads(lambda q, k, v: dense_attention(q, k, v, mask))(q, k, v)
  for name, x, reference in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert relative_error(x, reference) <= 1e-5, name


@pytest.mark.parametrize('per_head', [False, True])
def test_general_projection_matches_dense_on_projected_keys(per_head):
  attn = LinformerAttention(max_len=32, k=8, per_head=per_head, num_heads=HEADS,
                            rngs=nnx.Rngs(1))
  q, k, v = make_qkv(10, 20)
  mask = padding_mask(20, [20, 13])
  e = attn.key_projection[...][..., :20]
  f = attn.value_projection[...][..., :20]
  spec = 'hpn,bnhd->bphd' if per_head else 'pn,bnhd->bphd'

  @jax.jit
  def reference(q, k, v):
    # Eq. 7 with padding keys and values zeroed; a dense E reaches every position.
    real = mask[:, :, None, None]
    projected_k = jnp.einsum(spec, e, jnp.where(real, k, 0.0))
    projected_v = jnp.einsum(spec, f, jnp.where(real, v, 0.0))
    return dense_attention(q, projected_k, projected_v)

  got = jax.jit(lambda q, k, v: attn(q, k, v, mask))(q, k, v)
  np.testing.assert_allclose(got, reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_padding_keys_change_nothing():
  attn = LinformerAttention(max_len=32, k=8, rngs=nnx.Rngs(2))
  q, k, v = make_qkv(9, 24)
  mask = padding_mask(24, [17, 6])
  noise_k, noise_v = make_qkv(24, 24, seed=3)[1:]
  other_k = jnp.where(mask[:, :, None, None], k, 100.0 * noise_k)
  other_v = jnp.where(mask[:, :, None, None], v, 100.0 * noise_v)
  run = with_grads(lambda q, k, v: attn(q, k, v, mask))
  got, want = run(q, other_k, other_v), run(q, k, v)
  for x, reference in zip(got[:2], want[:2]):
    np.testing.assert_allclose(x, reference, rtol=1e-6, atol=1e-6)
  padded = ~mask[:, :, None, None]
  for x in got[2:]:
    assert not np.any(np.where(padded, x, 0.0)), 'padding keys must get no gradient'


def test_fully_masked_row_gives_zeros_without_nan():
  attn = LinformerAttention(max_len=16, k=4, rngs=nnx.Rngs(0))
  q, k, v = make_qkv(5, 16)
  mask = padding_mask(16, [10, 0])
  e, f = attn.key_projection[...], attn.value_projection[...]

  @jax.jit
  def out_and_grads(q, k, v, e, f):
    out, pullback = jax.vjp(lambda *args: linformer_attention(*args, mask), q, k, v, e, f)
    return (out,) + pullback(jnp.ones_like(out))

  out, *grads = out_and_grads(q, k, v, e, f)
  for x in [out] + grads:
    assert np.all(np.isfinite(x))
  assert not np.any(out[1]) and np.any(out[0])
  assert not np.any(grads[0][1]) and np.any(grads[0][0])


def test_share_kv_uses_one_parameter():
  params = lambda attn: jax.tree.leaves(nnx.state(attn, nnx.Param))
  assert len(params(LinformerAttention(max_len=32, k=8, share='kv', rngs=nnx.Rngs(0)))) == 1
  assert len(params(LinformerAttention(max_len=32, k=8, share='none', rngs=nnx.Rngs(0)))) == 2


def test_share_kv_projects_values_with_key_projection():
  attn = LinformerAttention(max_len=16, k=4, share='kv', rngs=nnx.Rngs(0))
  q, k, v = make_qkv(6, 16)
  e = attn.key_projection[...]
  got = jax.jit(lambda q, k, v: (attn(q, k, v), linformer_attention(q, k, v, e, e)))(q, k, v)
  np.testing.assert_allclose(*got, rtol=1e-6)


def test_projection_shapes_and_initialisation():
  shared = LinformerAttention(max_len=512, k=64, rngs=nnx.Rngs(0))
  per_head = LinformerAttention(max_len=512, k=64, per_head=True, num_heads=4, rngs=nnx.Rngs(0))
  assert shared.key_projection[...].shape == (64, 512)
  assert shared.value_projection[...].shape == (64, 512)
  assert per_head.key_projection[...].shape == (4, 64, 512)
  assert per_head.value_projection[...].shape == (4, 64, 512)
  # Xavier uniform with gain 1/sqrt(2): U(-a, a), a = sqrt(3 / (k + max_len)).
  bound = math.sqrt(3.0 / (64 + 512))
  for x in (shared.key_projection[...], per_head.key_projection[...]):
    assert np.abs(x).max() <= bound
    assert abs(float(x.std()) - bound / math.sqrt(3.0)) < 0.03 * bound
  assert not np.allclose(shared.key_projection[...], shared.value_projection[...])


def test_float32_and_bfloat16():
  attn = LinformerAttention(max_len=32, k=8, rngs=nnx.Rngs(0))
  q, k, v = make_qkv(16, 32)
  mask = padding_mask(32, [32, 20])
  run = with_grads(lambda q, k, v: attn(q, k, v, mask))
  want = run(q, k, v)
  got = run(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  for name, x, reference in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert reference.dtype == jnp.float32 and x.dtype == jnp.bfloat16, name
    assert np.all(np.isfinite(np.asarray(x, np.float32))), name
    assert relative_error(x, reference) < 3e-2, name


def test_jit_grad_and_pmap_over_devices_match_one_device():
  attn = LinformerAttention(max_len=16, k=4, rngs=nnx.Rngs(0))
  e, f = attn.key_projection[...], attn.value_projection[...]
  devices = jax.local_device_count()
  assert devices == 4
  q, k, v = (jnp.concatenate([x, x[::-1] * 0.5]) for x in make_qkv(12, 12, seed=5))
  mask = padding_mask(12, [12, 7, 0, 3])

  def out_and_grads(q, k, v, mask):
    fn = lambda q, k, v: linformer_attention(q, k, v, e, f, mask)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
    return (fn(q, k, v),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  one_device = jax.jit(out_and_grads)(q, k, v, mask)
  split = lambda x: x.reshape((devices, 1) + x.shape[1:])
  on_devices = jax.pmap(out_and_grads)(split(q), split(k), split(v), split(mask))
  for x, reference in zip(on_devices, one_device):
    np.testing.assert_allclose(x.reshape(reference.shape), reference, rtol=1e-5, atol=1e-6)


def test_registered_and_cross_attention_shapes():
  assert 'linformer' in attention.available_attentions()
  attn = attention.make_attention('linformer', max_len=32, k=8, rngs=nnx.Rngs(0))
  assert isinstance(attn, LinformerAttention)
  q, _, _ = make_qkv(7, 1)
  _, k, v = make_qkv(1, 20)
  out = jax.eval_shape(attn, q, k, v)
  assert (out.shape, out.dtype) == (q.shape, q.dtype)


def test_causal_raises():
  attn = LinformerAttention(max_len=16, k=4, rngs=nnx.Rngs(0))
  q, k, v = make_qkv(8, 8)
  with pytest.raises(ValueError, match='causal=True.*future'):
    attn(q, k, v, causal=True)


def test_kv_len_above_max_len_raises():
  attn = LinformerAttention(max_len=16, k=4, rngs=nnx.Rngs(0))
  q, k, v = make_qkv(8, 17)
  with pytest.raises(ValueError, match='kv_len=17 exceeds max_len=16'):
    attn(q, k, v)


@pytest.mark.parametrize('options, match', [
    ({'share': 'qkv'}, "share='qkv' is not supported; allowed: 'none', 'kv'"),
    ({'k': 0}, 'k must be a positive int, got 0'),
    ({'k': 2.5}, 'k must be a positive int'),
    ({'k': True}, 'k must be a positive int'),
    ({'max_len': -1}, 'max_len must be a positive int'),
    ({'per_head': 'yes'}, "per_head='yes' is not supported"),
    ({'num_heads': 0}, 'num_heads must be a positive int'),
    ({'per_head': True}, 'per_head=True needs num_heads'),
])
def test_bad_options_raise(options, match):
  with pytest.raises(ValueError, match=match):
    LinformerAttention(**options, rngs=nnx.Rngs(0))


def test_unknown_option_raises():
  with pytest.raises(ValueError, match='valid options: max_len, k, share, per_head, num_heads'):
    attention.make_attention('linformer', window=3)


@pytest.mark.parametrize('per_head', [False, True])
def test_wrong_number_of_heads_raises(per_head):
  attn = LinformerAttention(max_len=32, k=8, per_head=per_head, num_heads=HEADS,
                            rngs=nnx.Rngs(1))
  q, k, v = make_qkv(8, 8, heads=HEADS + 1)
  with pytest.raises(ValueError, match=f'num_heads={HEADS} but the inputs have {HEADS + 1} heads'):
    attn(q, k, v)


def test_pure_function_checks_projection_heads():
  q, k, v = make_qkv(8, 8)
  projection = jnp.ones((HEADS + 1, 4, 8))
  with pytest.raises(ValueError, match='one projection per head for 3 heads'):
    linformer_attention(q, k, v, projection, projection)
