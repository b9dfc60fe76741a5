"""Layers: MultiHeadAttention (any attention, Linen interop), Transformer and reversible
blocks, chunked feed-forward, positional encodings."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import efficient_attn as ea
from efficient_attn import layers


def make_mha(**kwargs):
  options = dict(num_heads=4, in_features=32, rngs=nnx.Rngs(0))
  options.update(kwargs)
  return ea.MultiHeadAttention(**options)


def test_self_and_cross_attention_shapes():
  mha = make_mha(out_features=24, context_features=12, qkv_features=64)
  x = jnp.ones((2, 10, 32))
  assert mha(x, jnp.ones((2, 7, 12)), mask=jnp.ones((2, 7), bool)).shape == (2, 10, 24)
  assert make_mha()(x).shape == (2, 10, 32)


def test_backends_agree_and_match_a_hand_computation():
  x = jax.random.normal(jax.random.key(0), (2, 50, 32))
  mask = jnp.arange(50)[None] < jnp.array([[50], [31]])
  dense = make_mha(attention_options={'backend': 'dense'})
  blocked = make_mha(attention_options={'backend': 'blocked', 'q_block': 16, 'kv_block': 16})
  got = blocked(x, mask=mask, causal=True)
  np.testing.assert_allclose(got, dense(x, mask=mask, causal=True), rtol=1e-5, atol=1e-5)
  # Same computation written out: project, attend per head, project back.
  q = jnp.einsum('bnf,fhd->bnhd', x, dense.query.kernel[...]) + dense.query.bias[...]
  k = jnp.einsum('bnf,fhd->bnhd', x, dense.key.kernel[...]) + dense.key.bias[...]
  v = jnp.einsum('bnf,fhd->bnhd', x, dense.value.kernel[...]) + dense.value.bias[...]
  y = ea.dense_attention(q, k, v, mask, causal=True)
  want = jnp.einsum('bnhd,hdf->bnf', y, dense.out.kernel[...]) + dense.out.bias[...]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causal_mha_has_no_gradient_from_the_future():
  mha = make_mha()
  x = jax.random.normal(jax.random.key(1), (1, 20, 32))
  dx = jax.grad(lambda x: jnp.sum(mha(x, causal=True)[:, :8]))(x)
  assert np.all(np.asarray(dx[:, 8:]) == 0) and np.any(np.asarray(dx[:, :8]) != 0)


def test_dropout_in_training_only():
  mha = make_mha(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(2), (2, 10, 32))
  assert not np.allclose(mha(x), mha(x))
  mha.eval()
  np.testing.assert_array_equal(mha(x), mha(x))


def test_bfloat16_compute():
  mha = make_mha(dtype=jnp.bfloat16)
  y = mha(jnp.ones((2, 10, 32), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and mha.query.kernel[...].dtype == jnp.float32


def test_usable_from_linen_through_bridge():

  class LinenModel(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nnx.bridge.to_linen(ea.MultiHeadAttention, num_heads=4, in_features=32)(x)

  x = jax.random.normal(jax.random.key(3), (2, 10, 32))
  variables = LinenModel().init(jax.random.key(0), x)
  y = LinenModel().apply(variables, x)
  assert y.shape == (2, 10, 32)
  grads = jax.grad(lambda v: jnp.sum(LinenModel().apply(v, x) ** 2))(variables)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_heads=3), 'qkv_features=32 must be divisible by num_heads=3'),
    (dict(num_heads=0), 'num_heads must be a positive int'),
    (dict(attention='nope'), "unknown attention 'nope'"),
    (dict(attention_options={'windw': 3}), r"unknown option\(s\) \['windw'\]"),
    (dict(dropout_rate=1.0), 'dropout_rate must be in'),
])
def test_bad_construction_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_mha(**kwargs)


def test_bad_call_raises():
  mha = make_mha()
  with pytest.raises(ValueError, match=r'x must have shape \[batch, length, features\]'):
    mha(jnp.ones((10, 32)))
  with pytest.raises(ValueError, match='context must have shape'):
    mha(jnp.ones((2, 10, 32)), jnp.ones((3, 10, 32)))
  with pytest.raises(ValueError, match='mask must have shape'):
    mha(jnp.ones((2, 10, 32)), mask=jnp.ones((2, 11), bool))


def test_shared_qk_lsh_has_no_key_projection_and_refuses_a_context():
  mha = make_mha(attention='lsh', attention_options={'chunk_len': 4})
  assert mha.key is None
  x = jax.random.normal(jax.random.key(4), (1, 16, 32))
  grads = nnx.grad(lambda m: jnp.sum(m(x, deterministic=True) ** 2))(mha)
  # Every parameter gets a gradient: no dead projection.
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match='cannot attend to a context'):
    mha(x, x)
  separate = make_mha(attention='lsh', attention_options={'chunk_len': 4, 'shared_qk': False})
  assert separate.key is not None


def test_dropout_under_plain_jit_with_explicit_rngs():
  mha = make_mha(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(5), (2, 10, 32))
  step = jax.jit(lambda x, key: mha(x, rngs=key))
  np.testing.assert_array_equal(step(x, jax.random.key(1)), step(x, jax.random.key(1)))
  assert not np.allclose(step(x, jax.random.key(1)), step(x, jax.random.key(2)))
  evaluate = jax.jit(lambda x: mha(x, deterministic=True))
  np.testing.assert_allclose(evaluate(x), make_mha(dropout_rate=0.0)(x), atol=1e-6)


def test_rotary_scores_depend_only_on_the_offset():
  q, k = jax.random.normal(jax.random.key(6), (2, 1, 12, 2, 16))
  positions = jnp.arange(12)
  scores = lambda shift: jnp.einsum(
      'bqhd,bkhd->bhqk', layers.rotary_embedding(q, positions + shift),
      layers.rotary_embedding(k, positions + shift))
  np.testing.assert_allclose(scores(7), scores(0), rtol=1e-4, atol=1e-4)
  # Not trivially so: moving only the keys changes the scores.
  moved = jnp.einsum('bqhd,bkhd->bhqk', layers.rotary_embedding(q, positions),
                     layers.rotary_embedding(k, positions + 3))
  assert not np.allclose(moved, scores(0), atol=1e-2)
  # Pair (2i, 2i + 1) at position p is turned by p * theta_i, theta_i = 10000^(-2i / 8).
  x = jnp.zeros((1, 5, 1, 8)).at[..., 0::2].set(1.0)
  angle = np.arange(5)[:, None] * 10000.0 ** (-2 * np.arange(4) / 8)
  rotated = layers.rotary_embedding(x)[0, :, 0]
  np.testing.assert_allclose(rotated[:, 0::2], np.cos(angle), atol=1e-6)
  np.testing.assert_allclose(rotated[:, 1::2], np.sin(angle), atol=1e-6)


def test_rotary_attention_matches_a_dense_oracle():
  mha = make_mha(rotary=True, attention_options={'backend': 'blocked', 'q_block': 8,
                                                 'kv_block': 8})
  x = jax.random.normal(jax.random.key(7), (2, 20, 32))
  mask = jnp.arange(20)[None] < jnp.array([[20], [13]])
  project = lambda dense: jnp.einsum('bnf,fhd->bnhd', x, dense.kernel[...]) + dense.bias[...]
  q, k = (layers.rotary_embedding(project(p)) for p in (mha.query, mha.key))
  y = ea.dense_attention(q, k, project(mha.value), mask, causal=True)
  want = jnp.einsum('bnhd,hdf->bnf', y, mha.out.kernel[...]) + mha.out.bias[...]
  np.testing.assert_allclose(mha(x, mask=mask, causal=True), want, rtol=1e-5, atol=1e-5)


def test_sinusoidal_positions_follow_the_formula():
  got = layers.sinusoidal_positions(50, 6)
  position, pair = np.arange(50)[:, None], np.arange(3)[None]
  angle = position / 10000.0 ** (2 * pair / 6)
  np.testing.assert_allclose(got[:, 0::2], np.sin(angle), atol=1e-5)
  np.testing.assert_allclose(got[:, 1::2], np.cos(angle), atol=1e-5)
  assert layers.sinusoidal_positions(4, 5).shape == (4, 5)


def test_transformer_block_is_pre_norm_residual():
  block = layers.TransformerBlock(32, 4, 48, attention_options={'backend': 'dense'},
                                  dropout_rate=0.3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(8), (2, 10, 32))
  mask = jnp.arange(10)[None] < jnp.array([[10], [6]])
  y = x + block.attention(block.attention_norm(x), mask=mask, causal=True)
  mlp = block.mlp
  want = y + mlp.out(jax.nn.gelu(mlp.hidden(block.mlp_norm(y))))
  got = block(x, mask, causal=True, deterministic=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Dropout in training, reproducible from an explicit key.
  train = jax.jit(lambda x, key: block(x, mask, rngs=key))
  np.testing.assert_array_equal(train(x, jax.random.key(1)), train(x, jax.random.key(1)))
  assert not np.allclose(train(x, jax.random.key(1)), got, atol=1e-3)


def test_learned_positions_are_added_and_bounded_by_max_len():
  encoding = layers.PositionalEncoding('learned', 8, 4, rngs=nnx.Rngs(0))
  x = jnp.zeros((1, 5, 4))
  np.testing.assert_array_equal(encoding(x)[0], encoding.embedding[:5])
  with pytest.raises(ValueError, match=r'sequence length 9 is longer than max_len=8'):
    encoding(jnp.zeros((1, 9, 4)))
  for kind in ('rotary', 'none'):
    np.testing.assert_array_equal(layers.PositionalEncoding(kind, 8, 4, rngs=nnx.Rngs(0))(x), x)


@pytest.mark.parametrize('build,message', [
    (lambda: make_mha(qkv_features=36, rotary=True), 'rotary=True needs an even head dimension'),
    (lambda: layers.PositionalEncoding('alibi', 8, 4, rngs=nnx.Rngs(0)),
     r"pos_encoding='alibi' is not supported; allowed: 'sinusoidal', 'learned'"),
    (lambda: layers.FeedForward(8, 16, dropout_rate=-0.1, rngs=nnx.Rngs(0)),
     r'dropout_rate must be in \[0, 1\)'),
    (lambda: layers.TransformerBlock(8, 2, 16, attention_dropout_rate=1.5, rngs=nnx.Rngs(0)),
     r'dropout_rate must be in \[0, 1\)'),
])
def test_bad_layer_arguments_raise(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_rotary_reaches_shared_qk_lsh_through_the_queries():
  mha = make_mha(rotary=True, attention='lsh', attention_options={'chunk_len': 4})
  x = jax.random.normal(jax.random.key(9), (1, 16, 32))
  project = lambda dense: jnp.einsum('bnf,fhd->bnhd', x, dense.kernel[...]) + dense.bias[...]

  @jax.jit
  def got_and_want(x):
    q = layers.rotary_embedding(project(mha.query))
    y = mha.attention(q, q, project(mha.value), deterministic=True)
    return mha(x, deterministic=True), jnp.einsum('bnhd,hdf->bnf', y, mha.out.kernel[...])

  got, want = got_and_want(x)
  np.testing.assert_allclose(got, want + mha.out.bias[...], rtol=1e-5, atol=1e-5)


def stack_loss(stack, x, mask, key, reference=False):
  """sum(output^2) of a ReversibleStack, through its own backward pass or, with
  `reference`, the same blocks in a plain loop under ordinary autodiff."""
  if not reference:
    y = stack(x, mask, causal=True, rngs=key)
  else:
    x1 = x2 = x
    for block, block_key in zip(stack.blocks, jax.random.split(key, len(stack.blocks))):
      x1, x2 = block(x1, x2, mask, causal=True, deterministic=False, rngs=block_key)
    y = (x1 + x2) / 2
  return jnp.sum(y ** 2)


def test_reversible_gradients_equal_ordinary_autodiff():
  # LSH attention and dropout: random parts that the recomputation must redraw alike.
  stack = layers.ReversibleStack(3, 32, 4, 48, dropout_rate=0.2, attention_dropout_rate=0.1,
                                 attention='lsh', attention_options={'chunk_len': 4},
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(10), (2, 16, 32))
  mask = jnp.arange(16)[None] < jnp.array([[16], [11]])
  grads = jax.jit(nnx.value_and_grad(stack_loss, argnums=(0, 1)), static_argnums=4)
  (loss, (dparams, dx)), (want_loss, (want_dparams, want_dx)) = (
      grads(stack, x, mask, jax.random.key(1), reference) for reference in (False, True))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert not np.allclose(dx, 0)
  for got, want in zip(jax.tree.leaves((dparams, dx)), jax.tree.leaves((want_dparams, want_dx))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max() + 1e-6)
  # Another key gives other dropout masks and rotations.
  other = grads(stack, x, mask, jax.random.key(2), False)
  assert not np.allclose(other[1][1], dx, atol=1e-3)
  # .eval() needs no key, also under plain jax.jit.
  stack.eval()
  np.testing.assert_array_equal(jax.jit(lambda x: stack(x, mask))(x),
                                jax.jit(lambda x: stack(x, mask, deterministic=True))(x))


def test_reversible_stack_follows_the_reformer_formula():
  stack = layers.ReversibleStack(1, 32, 4, 48, attention_options={'backend': 'dense'},
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(11), (2, 10, 32))
  mask = jnp.arange(10)[None] < jnp.array([[10], [6]])
  block = stack.blocks[0]

  @jax.jit
  def got_and_want(x):
    # Two copies of x; y1 = x1 + attention(norm(x2)), y2 = x2 + mlp(norm(y1)); their mean.
    y1 = x + block.attention(block.attention_norm(x), mask=mask)
    mlp = block.mlp
    y2 = x + mlp.out(jax.nn.gelu(mlp.hidden(block.mlp_norm(y1))))
    # Training mode without keys: nothing is random here.
    return stack(x, mask), (y1 + y2) / 2

  got, want = got_and_want(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reversible_sequence_needs_blocks_of_one_structure():
  blocks = [layers.ReversibleBlock(8, 2, mlp_dim, rngs=nnx.Rngs(0)) for mlp_dim in (16, 24)]
  x = jnp.zeros((1, 4, 8))
  with pytest.raises(ValueError, match='blocks of one structure'):
    layers.reversible_sequence(blocks, x, x, None, None, causal=False, deterministic=True)


def array_sizes(jaxpr) -> list[int]:
  """Sizes of every array in a closed jaxpr, inner jaxprs (scan, checkpoint) included."""
  sizes = []
  for eqn in jaxpr.eqns:
    sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, 'shape')]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      sizes += array_sizes(sub)
  return sizes


def test_chunked_feed_forward_equals_unchunked_and_never_holds_the_whole_hidden_layer():
  chunked = layers.FeedForward(16, 48, chunk_size=8, dropout_rate=0.5, rngs=nnx.Rngs(0))
  whole = layers.FeedForward(16, 48, dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(12), (2, 37, 16))  # 37: the last chunk is padded
  loss = lambda ff, x: jnp.sum(ff(x, deterministic=True) ** 2)
  grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
  (got, got_grads), (want, want_grads) = grads(chunked, x), grads(whole, x)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Forward and backward hold at most a chunk of the [2, 37, 48] hidden activation.
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: loss(chunked, x)))(x)
  assert max(array_sizes(jaxpr.jaxpr)) < 2 * 37 * 48
  # Dropout: reproducible from the call's key.
  train = jax.jit(lambda x, key: chunked(x, rngs=key))
  np.testing.assert_array_equal(train(x, jax.random.key(1)), train(x, jax.random.key(1)))
  dropped = np.asarray(train(x, jax.random.key(1)))
  assert not np.allclose(dropped, chunked(x, deterministic=True), atol=1e-3)
  with pytest.raises(ValueError, match=r'chunk_size \(ff_chunk_size\) must be a positive int'):
    layers.FeedForward(16, 48, chunk_size=0, rngs=nnx.Rngs(0))
