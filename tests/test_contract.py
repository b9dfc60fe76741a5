"""The contract every registered mechanism keeps, tested for each one the day it is registered."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import efficient_attn as ea

BATCH, LENGTH, HEADS, HEAD_DIM, VALUE_DIM = 2, 32, 2, 8, 6
# Small settings so that every mechanism does real work at LENGTH; a mechanism
# registered without an entry here is tested with its defaults.
SMALL_OPTIONS = {
    'lsh': {'chunk_len': 8},
    'linformer': {'max_len': LENGTH, 'k': 8},
    'performer': {'num_features': 16},
    'longformer': {'window': 4},
    'sinkhorn': {'block_len': 8, 'gumbel_noise': True},
    'routing': {'num_clusters': 4},
    'bigbird': {'block_len': 4, 'num_global_blocks': 1, 'num_random_blocks': 2},
    'linear': {'chunk_len': 4, 'block_len': 8, 'chunks_per_step': 2},
    'synthesizer': {'max_len': LENGTH, 'variant': 'dense', 'num_heads': HEADS,
                    'head_dim': HEAD_DIM},
    'local': {'block_len': 8, 'look_back': True},
    'sparse': {'block_len': 8, 'summary_len': 2},
}
NAMES = ea.available_attentions()
# Keys 0..19 of row 0 and 0..9 of row 1 are real.
MASK = np.arange(LENGTH)[None, :] < np.array([[20], [10]])


def make(name, seed=0, **options):
  return ea.make_attention(name, rngs=nnx.Rngs(seed), **{**SMALL_OPTIONS.get(name, {}),
                                                         **options})


def inputs(dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  shape = (BATCH, LENGTH, HEADS, HEAD_DIM)
  q = jax.random.normal(kq, shape, dtype)
  k = jax.random.normal(kk, shape, dtype)
  v = jax.random.normal(kv, shape[:3] + (VALUE_DIM,), dtype)
  return q, k, v


def causal_modes(name):
  return (False, True) if ea.attention_class(name).supports_causal else (False,)


@pytest.mark.parametrize('name', NAMES)
def test_shape_and_dtype_with_value_dim_unlike_head_dim(name):
  attn = make(name)
  out = jax.jit(lambda q, k, v: attn(q, k, v, deterministic=True))(*inputs())
  assert out.shape == (BATCH, LENGTH, HEADS, VALUE_DIM) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_forward_and_gradients_finite(name):
  attn = make(name)
  q, k, v = inputs(jnp.bfloat16)
  call = lambda q, k, v: attn(q, k, v, mask=MASK, deterministic=True)
  loss = lambda q, k, v: jnp.sum(call(q, k, v).astype(jnp.float32))
  out, grads = jax.jit(lambda *a: (call(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(out.astype(jnp.float32)))
  for g, x in zip(grads, (q, k, v)):
    assert g.dtype == jnp.bfloat16 and g.shape == x.shape
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize('name', NAMES)
def test_padding_invariance_of_q_k_and_v(name):
  attn = make(name)
  q, k, v = inputs()
  noise = inputs(seed=1)
  padded = ~MASK[:, :, None, None]
  changed = [jnp.where(padded, 5 * n, x) for x, n in zip((q, k, v), noise)]
  for causal in causal_modes(name):
    call = jax.jit(lambda q, k, v: attn(q, k, v, mask=MASK, causal=causal, deterministic=True))
    want = call(q, k, v)
    for i in range(3):
      args = [q, k, v]
      args[i] = changed[i]
      got = call(*args)
      np.testing.assert_allclose(np.where(MASK[:, :, None, None], got, 0),
                                 np.where(MASK[:, :, None, None], want, 0),
                                 atol=2e-6, err_msg=f'causal={causal}, changed {"qkv"[i]}')


@pytest.mark.parametrize('name', NAMES)
def test_fully_masked_row_gives_zeros_and_finite_gradients(name):
  attn = make(name)
  q, k, v = inputs()
  mask = MASK.copy()
  mask[1] = False
  for causal in causal_modes(name):
    call = lambda q, k, v: attn(q, k, v, mask=mask, causal=causal, deterministic=True)
    grad = jax.grad(lambda *a: jnp.sum(call(*a) ** 2), argnums=(0, 1, 2))
    out, grads = jax.jit(lambda *a: (call(*a), grad(*a)))(q, k, v)
    assert np.all(np.asarray(out[1]) == 0), f'causal={causal}'
    assert np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize('name', [n for n in NAMES if ea.attention_class(n).supports_causal])
def test_causal_with_padding_has_zero_gradient_from_the_future(name):
  attn = make(name)
  q, k, v = inputs()
  split = 12
  loss = lambda q, k, v: jnp.sum(
      attn(q, k, v, mask=MASK, causal=True, deterministic=True)[:, :split] ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for g, used in zip(grads, (True, attn.uses_keys, True)):
    assert np.all(np.asarray(g[:, split:]) == 0)
    assert np.any(np.asarray(g[0, :split]) != 0) == used


@pytest.mark.parametrize('name', [n for n in NAMES if not ea.attention_class(n).supports_causal])
def test_unsupported_causal_raises_saying_why(name):
  with pytest.raises(ValueError, match='causal'):
    make(name)(*inputs(), causal=True)


@pytest.mark.parametrize('name', NAMES)
def test_plain_jax_transforms_deterministic(name):
  attn = make(name)
  q, k, v = inputs()
  want = jax.jit(lambda q, k, v: attn(q, k, v, mask=MASK, deterministic=True))(q, k, v)
  assert want.shape == v.shape and np.all(np.isfinite(want))
  # vmap over the batch axis, one example per call (jitted: eager runs are slow).
  one = lambda q, k, v, m: attn(q[None], k[None], v[None], mask=m[None], deterministic=True)[0]
  np.testing.assert_allclose(jax.jit(jax.vmap(one))(q, k, v, MASK), want, atol=1e-5)
  grad = jax.jit(jax.grad(
      lambda q: jnp.sum(attn(q, k, v, mask=MASK, deterministic=True) ** 2)))(q)
  assert grad.shape == q.shape and np.all(np.isfinite(grad))


@pytest.mark.parametrize('name', NAMES)
def test_plain_jax_transforms_with_explicit_rngs_leave_module_state_alone(name):
  attn = make(name, **({'redraw': 'every_call'} if name == 'performer' else {}))
  state_before = _snapshot(attn)
  q, k, v = inputs()
  call = lambda q, key: attn(q, k, v, mask=MASK, rngs=key)
  key = jax.random.key(7)
  jitted = jax.jit(call)
  out = jitted(q, key)
  np.testing.assert_allclose(jitted(q, key), out)  # same key, same draw
  grad = jax.jit(jax.grad(lambda q, key: jnp.sum(call(q, key) ** 2)))(q, key)
  assert np.all(np.isfinite(grad))
  batched = jax.jit(jax.vmap(call, in_axes=(None, 0)))(q, jax.random.split(key, 2))
  assert batched.shape == (2,) + out.shape and np.all(np.isfinite(batched))
  jax.tree.map(np.testing.assert_array_equal, _snapshot(attn), state_before)
  if isinstance(attn, ea.RandomAttention):
    assert not np.allclose(jitted(q, jax.random.key(8)), out), 'another key, another draw'
    # uint32 key data, not a typed key: plain arrays, serialisable.
    assert attn.fixed_key[...].dtype == jnp.uint32


def _snapshot(module):
  """The module's state as numpy arrays (typed keys as their key data)."""
  as_numpy = lambda x: np.asarray(
      jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  return jax.tree.map(as_numpy, nnx.state(module))


def _linen_model(name):

  class LinenModel(nn.Module):

    @nn.compact
    def __call__(self, x, deterministic):
      return nnx.bridge.to_linen(
          ea.MultiHeadAttention, num_heads=HEADS, in_features=16, attention=name,
          attention_options=SMALL_OPTIONS.get(name, {}), dropout_rate=0.2)(
              x, deterministic=deterministic)

  return LinenModel()


@pytest.mark.parametrize('name', NAMES)
def test_from_linen_through_the_bridge_in_both_modes(name):
  model = _linen_model(name)
  x = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, 16))
  variables = jax.jit(model.init, static_argnames='deterministic')(
      jax.random.key(0), x, deterministic=True)
  flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
  evaluate = jax.jit(lambda variables, x: model.apply(variables, x, deterministic=True))
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))

  def train_loss(params, key):
    rngs = {'dropout': key, 'attention': key}
    y = model.apply({**variables, 'params': params}, x, deterministic=False, rngs=rngs)
    return jnp.sum(y ** 2)

  step = jax.jit(jax.value_and_grad(train_loss))
  (loss_a, grads), (loss_b, _) = step(variables['params'], jax.random.key(1)), step(
      variables['params'], jax.random.key(2))
  assert loss_a != loss_b, 'fresh randomness from the Linen rng streams every step'
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('name', [n for n in NAMES if ea.attention_class(n).needs_rngs])
def test_no_default_seed(name):
  with pytest.raises(ValueError, match='needs rngs'):
    ea.make_attention(name, **SMALL_OPTIONS.get(name, {}))


def test_bad_call_rngs_raise():
  attn = make('lsh')
  with pytest.raises(ValueError, match='rngs must be None, a jax random key'):
    attn(*inputs(), rngs=3.0)


def test_longformer_too_many_global_tokens_raise_also_under_jit():
  attn = make('longformer', max_global=2)
  q, k, v = inputs()
  global_mask = np.zeros((BATCH, LENGTH), bool)
  global_mask[1, [0, 5, 9]] = True
  with pytest.raises(ValueError, match='3 global tokens in a row but max_global=2'):
    attn(q, k, v, global_mask=global_mask)
  jitted = jax.jit(lambda q, global_mask: attn(q, k, v, global_mask=global_mask))
  with pytest.raises(Exception, match='3 global tokens in a row but max_global=2'):
    jax.block_until_ready(jitted(q, global_mask))
  global_mask[1, 9] = False
  assert np.all(np.isfinite(jitted(q, global_mask)))
  # A concrete mask closed over by a jitted function is checked at trace time.
  closed = jnp.asarray(global_mask)
  assert np.all(np.isfinite(jax.jit(lambda q: attn(q, k, v, global_mask=closed))(q)))
  # Without the per-step check the first max_global of a row are global, silently.
  unchecked = make('longformer', max_global=2, check_global_count=False)
  global_mask[1, 9] = True
  jitted = jax.jit(lambda q, global_mask: unchecked(q, k, v, global_mask=global_mask))
  first_two = global_mask.copy()
  first_two[1, 9] = False
  np.testing.assert_allclose(jitted(q, global_mask), jitted(q, first_two), atol=1e-6)
