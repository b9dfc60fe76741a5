"""Tests of the Synthesizer attention (dense and random, plain and factorized)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.attention import synthesizer

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
HEADS, LENGTH, HEAD_DIM, VALUE_DIM, MAX_LEN = 2, 12, 4, 3, 16
# Keys 9.. are padding; with causal, query i sees keys 0..min(i, 8).
MASK = np.arange(LENGTH)[None, :] < 9
VARIANTS = [('dense', False), ('dense', True), ('random', False), ('random', True)]


def _qkv(seed, batch=1, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k = rng.standard_normal((2, batch, LENGTH, HEADS, HEAD_DIM))
  v = rng.standard_normal((batch, LENGTH, HEADS, VALUE_DIM))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _make(variant, factorized, **options):
  options = {'max_len': MAX_LEN, 'rank': HEAD_DIM, 'num_heads': HEADS, 'head_dim': HEAD_DIM,
             **options}
  return ea.make_attention('synthesizer', variant=variant, factorized=factorized,
                           rngs=nnx.Rngs(0), **options)


def _exact_logit_params(variant, factorized, q, k):
  """Weights whose synthetic logits for batch row 0 are q.k / sqrt(d) (padded to MAX_LEN)."""
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, MAX_LEN - x.shape[-1])])
  qh = q[0].transpose(1, 0, 2) / np.sqrt(HEAD_DIM)  # [heads, len, d]
  kh = k[0].transpose(1, 2, 0)  # [heads, d, len]
  if variant == 'random' and factorized:
    return {'random_1': pad(qh.transpose(0, 2, 1)).transpose(0, 2, 1), 'random_2': pad(kh)}
  if variant == 'random':
    logits = jnp.einsum('hid,hdj->hij', qh, kh)
    return {'random': pad(pad(logits).transpose(0, 2, 1)).transpose(0, 2, 1)}
  # relu(q I + c) = q + c for |q| < c; the bias b2 removes c's share.
  c = 10.0
  w1 = jnp.broadcast_to(jnp.eye(HEAD_DIM), (HEADS, HEAD_DIM, HEAD_DIM))
  w2 = pad(kh) / np.sqrt(HEAD_DIM)
  b2 = -c * w2.sum(1)
  return {'w1': w1, 'b1': jnp.full((HEADS, HEAD_DIM), c), 'w2': w2, 'b2': b2}


@pytest.mark.parametrize('variant,factorized', [('dense', False), ('random', False),
                                                ('random', True)])
def test_exact_logits_give_exact_attention_and_gradients(variant, factorized):
  q, k, v = _qkv(0)
  params = _exact_logit_params(variant, factorized, q, k)
  for causal in (False, True):
    def outputs(q, v):
      mine = synthesizer.synthesizer_attention(q, k, v, params, MASK, causal, variant, factorized)
      return mine, ea.dense_attention(q, k, v, mask=MASK, causal=causal)

    def losses(q, v):
      weights = jax.random.normal(jax.random.key(1), v.shape)
      return [jnp.sum(weights * out) for out in outputs(q, v)]

    mine, want = jit(outputs)(q, v)
    np.testing.assert_allclose(mine, want, rtol=1e-5, atol=1e-5)
    grads = jit(lambda q, v: [jax.grad(lambda q, v, i=i: losses(q, v)[i], argnums=(0, 1))(q, v)
                              for i in (0, 1)])(q, v)
    # q enters only the dense logits; v's gradient must match in every variant.
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)
    if variant == 'dense':
      np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)


def test_factorized_dense_logits_are_tiled_times_repeated():
  attn = _make('dense', True)
  q, _, _ = _qkv(1)
  params = attn.params()
  logits = synthesizer.synthetic_logits(q, params, 'dense', LENGTH)
  hidden = jax.nn.relu(jnp.einsum('bihd,hde->bhie', q, params['w1']) + params['b1'][:, None])
  a = jnp.einsum('bhie,her->bhir', hidden, params['w2_a']) + params['b2_a'][:, None]
  b = jnp.einsum('bhie,her->bhir', hidden, params['w2_b']) + params['b2_b'][:, None]
  j = np.arange(LENGTH)
  np.testing.assert_allclose(logits, a[..., j % HEAD_DIM] * b[..., j // HEAD_DIM], rtol=1e-6)


@pytest.mark.parametrize('variant,factorized', VARIANTS)
def test_masks_causality_and_gradients_reach_every_parameter(variant, factorized):
  attn = _make(variant, factorized)
  q, k, v = _qkv(2, batch=2)
  mask = np.stack([MASK[0], np.zeros(LENGTH, bool)])  # row 1 sees no key
  graphdef, params = nnx.split(attn, nnx.Param)
  split = 5

  @jit
  def run(params, q, v):
    def loss(params, q, v):
      out = nnx.merge(graphdef, params)(q, k, v, mask=mask, causal=True)
      return jnp.sum(out[:, :split] ** 2), out
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(params, q, v)

  (grad_params, grad_q, grad_v), out = run(params, q, v)
  assert out.shape == (2, LENGTH, HEADS, VALUE_DIM)
  assert np.all(np.asarray(out[1]) == 0) and np.all(np.asarray(out[0]) != 0)
  assert np.all(np.asarray(grad_q[:, split:]) == 0) and np.all(np.asarray(grad_v[:, split:]) == 0)
  assert np.all(np.asarray(grad_v[1]) == 0) and np.any(np.asarray(grad_v[0, :split]) != 0)
  assert np.any(np.asarray(grad_q[0, :split]) != 0) == (variant == 'dense')
  for path, grad in nnx.to_flat_state(grad_params):
    assert np.all(np.isfinite(grad[...])) and np.any(grad[...] != 0), path
  if variant == 'random' and not factorized:
    # Logits of padding keys, of future keys and beyond the length get no gradient.
    grad = np.asarray(grad_params['random'][...])
    assert np.all(grad[:, :, 9:] == 0) and np.all(grad[:, split:] == 0)
    assert np.all(grad[:, :split, :split][:, np.triu(np.ones((split, split), bool), 1)] == 0)


@pytest.mark.parametrize('variant,factorized', VARIANTS)
def test_padding_positions_do_not_change_real_outputs(variant, factorized):
  attn = _make(variant, factorized)
  q, k, v = _qkv(3)
  noise_q, noise_k, noise_v = _qkv(4)
  padded = ~MASK[:, :, None, None]
  call = jit(lambda q, k, v: attn(q, k, v, mask=MASK))
  want = call(q, k, v)
  got = call(jnp.where(padded, 9 * noise_q, q), 9 * noise_k, jnp.where(padded, 9 * noise_v, v))
  np.testing.assert_allclose(got[:, :9], want[:, :9], rtol=1e-6, atol=1e-6)


def test_shorter_inputs_use_the_first_positions():
  attn = _make('random', False)
  q, k, v = _qkv(5)
  short = jit(lambda q, k, v: attn(q, k, v))(q[:, :7], k[:, :7], v[:, :7])
  weights = jax.nn.softmax(attn.random[...][:, :7, :7], axis=-1)
  np.testing.assert_allclose(short, jnp.einsum('hij,bjhd->bihd', weights, v[:, :7]),
                             rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32():
  q, k, v = _qkv(6, dtype=jnp.bfloat16)
  for variant, factorized in VARIANTS:
    attn = _make(variant, factorized)
    call = jit(lambda q, k, v: attn(q, k, v, mask=MASK, causal=True))
    out = call(q, k, v)
    assert out.dtype == jnp.bfloat16
    want = call(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=0.05)


def test_multi_head_attention_builds_no_key_projection():
  mha = ea.MultiHeadAttention(num_heads=HEADS, in_features=8, attention='synthesizer',
                              attention_options={'max_len': MAX_LEN},
                              rngs=nnx.Rngs(0))
  assert mha.key is None
  assert mha(jnp.ones((1, LENGTH, 8))).shape == (1, LENGTH, 8)


@pytest.mark.parametrize('options,message', [
    ({}, 'synthesizer needs max_len'),
    ({'max_len': 0, 'variant': 'random'}, 'max_len must be a positive int'),
    ({'max_len': 8, 'variant': 'mixed'},
     "variant='mixed' is not supported; allowed: 'dense', 'random'"),
    ({'max_len': 8, 'variant': 'dense'}, "variant='dense' needs head_dim"),
    ({'max_len': 8, 'variant': 'random', 'factorized': 'yes'}, "factorized='yes' is not"),
    ({'max_len': 8, 'variant': 'random', 'rank': 0}, 'rank must be a positive int'),
    ({'max_len': 8, 'variant': 'random', 'num_heads': -2}, 'num_heads must be a positive int'),
])
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    ea.make_attention('synthesizer', rngs=nnx.Rngs(0), **options)


def test_bad_inputs_raise():
  q, k, v = _qkv(7)
  with pytest.raises(ValueError, match='kv_len=12 exceeds max_len=10'):
    _make('dense', False, max_len=10)(q[:, :5], k, v)
  with pytest.raises(ValueError, match='q_len=12 exceeds max_len=10'):
    _make('random', True, max_len=10)(q, k[:, :5], v[:, :5])
  with pytest.raises(ValueError, match='num_heads=2 but the inputs have 1 heads'):
    _make('random', False)(q[:, :, :1], k[:, :, :1], v[:, :, :1])
  with pytest.raises(ValueError, match='head_dim=4 but the inputs have head_dim 2'):
    _make('dense', False)(q[..., :2], k[..., :2], v)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    _make('dense', False)(q[:, :5], k, v, causal=True)
