"""Models: padding invariance for every attention, causality, training, dtypes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import efficient_attn as ea
from efficient_attn import models
from efficient_attn.data import common

TINY = dict(vocab_size=12, max_len=32, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32,
            dropout_rate=0.1, attention_dropout_rate=0.1)
# Options that fit lengths 16-32; a mechanism not listed runs with its defaults.
OPTIONS = {'lsh': {'chunk_len': 8, 'n_buckets': 4}, 'linformer': {'max_len': 33, 'k': 8},
           'performer': {'num_features': 16}, 'longformer': {'window': 4},
           'synthesizer': {'max_len': 33}}
# Padding invariance is exact math for every mechanism: float32 rounding only. LSH
# gets one chunk there: with several, the first chunk looks back to the last one,
# which padding changes (a property of chunked LSH, not of the padding mask).
# Routing gets one cluster for the same reason: a cluster holds ceil(length /
# num_clusters) tokens, so appended padding changes which tokens share one.
PADDING_OPTIONS = dict(OPTIONS, lsh={'chunk_len': 32, 'n_buckets': 4},
                       routing={'num_clusters': 1})


def tokens(key, shape):
  return jax.random.randint(key, shape, 1, TINY['vocab_size'])


def padded(inputs, mask, extra):
  """`inputs` and `mask` with `extra` positions of random tokens appended as padding."""
  garbage = tokens(jax.random.key(99), (inputs.shape[0], extra))
  return (jnp.concatenate([inputs, garbage], axis=1),
          jnp.concatenate([mask, jnp.zeros_like(garbage, bool)], axis=1))


def make(kind, attention='full', options=OPTIONS, **kwargs):
  options = dict(TINY, attention=attention, attention_options=options.get(attention),
                 rngs=nnx.Rngs(0))
  if kind != 'causal_lm':
    options['num_classes'] = 3
  options.update(kwargs)
  return models.make_model(kind, **options)


def evaluate(model):
  """The model's deterministic logits as one jitted function of the batch."""
  return jax.jit(lambda batch: model(batch, deterministic=True))


@pytest.mark.parametrize('attention', ea.available_attentions())
def test_padding_does_not_change_classifier_logits(attention):
  logits = evaluate(make('classification', attention, PADDING_OPTIONS))
  inputs = tokens(jax.random.key(0), (2, 16))
  mask = jnp.arange(16)[None] < jnp.array([[16], [11]])
  want = logits({'inputs': inputs, 'mask': mask})
  inputs, mask = padded(inputs, mask, 8)
  np.testing.assert_allclose(logits({'inputs': inputs, 'mask': mask}), want,
                             rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_cls_or_pair_logits():
  inputs = tokens(jax.random.key(1), (2, 16))
  mask = jnp.arange(16)[None] < jnp.array([[16], [9]])
  long_inputs, long_mask = padded(inputs, mask, 8)
  classifier = evaluate(make('classification', pooling='cls', pos_encoding='learned'))
  np.testing.assert_allclose(classifier({'inputs': long_inputs, 'mask': long_mask}),
                             classifier({'inputs': inputs, 'mask': mask}), rtol=1e-5, atol=1e-5)
  model = make('pair_classification', pos_encoding='rotary')
  dual = evaluate(model)
  pair = lambda x, m: {'inputs1': x, 'mask1': m, 'inputs2': x[::-1], 'mask2': m[::-1]}
  want = dual(pair(inputs, mask))
  np.testing.assert_allclose(dual(pair(long_inputs, long_mask)), want, rtol=1e-5, atol=1e-5)
  # One shared encoder, its outputs u and v combined as [u, v, u * v, u - v].
  u, v = (model.encoder(x, m, deterministic=True) for x, m in ((inputs, mask),
                                                                (inputs[::-1], mask[::-1])))
  np.testing.assert_allclose(model.head(jnp.concatenate([u, v, u * v, u - v], -1)), want,
                             rtol=1e-5, atol=1e-5)


def test_mean_pooling_leaves_padding_out():
  x = jnp.arange(12.0).reshape(2, 3, 2)
  mask = jnp.array([[True, True, False], [False, False, False]])
  np.testing.assert_allclose(models.masked_mean(x, mask), [[1.0, 2.0], [0.0, 0.0]])


@pytest.mark.parametrize('attention', [name for name in ea.available_attentions()
                                       if ea.attention_class(name).supports_causal])
def test_language_model_logits_see_no_future_token(attention):
  lm = make('causal_lm', attention, pos_encoding='rotary')
  inputs = tokens(jax.random.key(2), (1, 16))
  mask = jnp.arange(16)[None] < 14
  logits = lambda x: lm.logits(lm.encoder.encode(x, mask, deterministic=True))
  t = 6
  x = lm.encoder.embed(inputs)
  dx = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(logits(x)[:, t] ** 2)))(x))
  # Exactly zero from every later position; the token itself counts.
  assert np.all(dx[:, t + 1:] == 0) and np.any(dx[:, t] != 0)


def toy_batch(kind):
  """A fixed batch of 16 examples of a learnable task of each kind."""
  inputs = tokens(jax.random.key(3), (16, 16))
  mask = jnp.arange(16)[None] < jax.random.randint(jax.random.key(4), (16, 1), 4, 17)
  inputs = jnp.where(mask, inputs, 0)
  if kind == 'causal_lm':
    # Each token is the previous one plus one (mod the vocabulary of 1..11).
    counting = (inputs[:, :1] + jnp.arange(17)) % 11 + 1
    return {'inputs': counting[:, :-1], 'mask': mask, 'targets': counting[:, 1:],
            'weights': jnp.ones(16)}
  if kind == 'pair_classification':
    other = tokens(jax.random.key(5), (16, 16))
    return {'inputs1': inputs, 'mask1': mask, 'inputs2': other, 'mask2': mask,
            'targets': (inputs[:, 0] + other[:, 0]) % 2, 'weights': jnp.ones(16)}
  return {'inputs': inputs, 'mask': mask, 'targets': inputs[:, 0] % 2, 'weights': jnp.ones(16)}


def loss_fn(model, batch, key):
  logits = model(batch, rngs=key)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  if losses.ndim == 2:
    return jnp.sum(losses * batch['mask']) / jnp.sum(batch['mask'])
  return jnp.mean(losses)


def test_training_lowers_the_loss_in_a_plain_nnx_loop():
  # The trainer's own runs (tests/test_train.py) cover the other model families.
  kind = 'classification'
  model = make(kind)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  batch = toy_batch(kind)

  @nnx.jit
  def train_step(model, optimizer, key):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch, key)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, jax.random.key(i))) for i in range(20)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


def test_bfloat16_compute_with_float32_parameters():
  batch = toy_batch('classification')
  model = make('classification', dtype=jnp.bfloat16)
  logits = evaluate(model)(batch)
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  want = evaluate(make('classification'))(batch)
  np.testing.assert_allclose(logits, want, atol=0.1)


def test_classifier_usable_from_linen_through_bridge():

  class LinenClassifier(nn.Module):

    @nn.compact
    def __call__(self, batch, deterministic):
      classifier = nnx.bridge.to_linen(models.Classifier, num_classes=3, **TINY)
      return classifier(batch, deterministic=deterministic)

  batch = toy_batch('classification')
  variables = LinenClassifier().init(jax.random.key(0), batch, True)

  @jax.jit
  def loss_and_logits(variables, key):
    """Deterministic logits, their loss and its gradient, and logits with dropout from key."""
    logits = lambda v: LinenClassifier().apply(v, batch, True)
    loss = lambda v: (jnp.sum(logits(v) ** 2), logits(v))
    (_, clean), grads = jax.value_and_grad(loss, has_aux=True)(variables)
    dropped = LinenClassifier().apply(variables, batch, False, rngs={'dropout': key})
    return clean, grads, dropped

  clean, grads, dropped = loss_and_logits(variables, jax.random.key(1))
  assert clean.shape == (16, 3) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  again, _, dropped_again = loss_and_logits(variables, jax.random.key(1))
  np.testing.assert_array_equal(again, clean)
  np.testing.assert_array_equal(dropped_again, dropped)
  assert not np.allclose(dropped, clean, atol=1e-3)
  assert not np.allclose(loss_and_logits(variables, jax.random.key(2))[2], dropped, atol=1e-3)


def test_task_kind_picks_the_model():
  task = lambda **flags: common.Task('t', 'train', None, 10, 2, 16, **flags)
  assert models.task_kind_of(task()) == 'classification'
  assert models.task_kind_of(task(pair=True)) == 'pair_classification'
  assert models.task_kind_of(task(causal_lm=True)) == 'causal_lm'


@pytest.mark.parametrize('kind,kwargs,message', [
    ('classification', dict(pos_encoding='alibi'),
     r"pos_encoding='alibi' is not supported; allowed: 'sinusoidal', 'learned', 'rotary', 'none'"),
    ('classification', dict(pooling='max'),
     r"pooling='max' is not supported; allowed: 'mean', 'cls'"),
    ('pair_classification', dict(num_heads=3),
     r'emb_dim=16 must be divisible by num_heads=3'),
    ('classification', dict(qkv_dim=10, num_heads=4),
     r'qkv_dim=10 must be divisible by num_heads=4'),
    ('causal_lm', dict(attention='linformer'),
     r"attention='linformer' cannot be causal, which this model needs; allowed: 'full'"),
    ('classification', dict(attention='nope'), r"unknown attention 'nope'; available: full"),
    ('classification', dict(dropout_rate=1.0), r'dropout_rate must be in \[0, 1\)'),
    ('classification', dict(reversible='yes'),
     r"reversible='yes' is not supported; allowed: False, True"),
    ('classification', dict(ff_chunk_size=0),
     r'chunk_size \(ff_chunk_size\) must be a positive int, got 0'),
    ('classifier', {}, r"task_kind='classifier' is not supported; allowed: 'classification'"),
])
def test_bad_construction_raises(kind, kwargs, message):
  with pytest.raises(ValueError, match=message):
    make(kind, **kwargs)


def test_bad_batch_raises():
  model = make('classification', pos_encoding='learned')
  mask = jnp.ones((2, 40), bool)
  with pytest.raises(ValueError, match=r'sequence length 40 is longer than max_len=32'):
    model({'inputs': jnp.ones((2, 40), jnp.int32), 'mask': mask})
  with pytest.raises(ValueError, match=r'inputs must be int token ids \[batch, length\]'):
    model({'inputs': jnp.ones((2, 16)), 'mask': mask[:, :16]})
  with pytest.raises(ValueError, match=r'mask must be bool \[batch, length\] = \(2, 16\)'):
    model({'inputs': jnp.ones((2, 16), jnp.int32), 'mask': mask})
  dual = make('pair_classification')
  with pytest.raises(ValueError, match='inputs1 and inputs2 must have one shape'):
    dual({'inputs1': jnp.ones((2, 16), jnp.int32), 'mask1': mask[:, :16],
          'inputs2': jnp.ones((2, 8), jnp.int32), 'mask2': mask[:, :8]})


def test_reversible_model_trains_under_nnx_jit_and_jax_jit_alike():
  kind = 'classification'
  model = make(kind, reversible=True, ff_chunk_size=8, num_layers=2)
  batch = toy_batch(kind)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def functional_grads(params, rest, key):
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, key))(params)

  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, key):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch, key)
    optimizer.update(model, grads)
    return loss, grads

  want = functional_grads(params, rest, jax.random.key(0))
  losses = []
  for i in range(20):
    loss, grads = train_step(model, optimizer, jax.random.key(i))
    losses.append(float(loss))
    if i == 0:
      for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


def test_reversible_language_model_sees_no_future_token():
  lm = make('causal_lm', reversible=True, num_layers=2)
  inputs = tokens(jax.random.key(6), (1, 16))
  mask = jnp.arange(16)[None] < 14
  x = lm.encoder.embed(inputs)
  t = 6
  logits = lambda x: lm.logits(lm.encoder.encode(x, mask, rngs=jax.random.key(0)))
  dx = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(logits(x)[:, t] ** 2)))(x))
  assert np.all(dx[:, t + 1:] == 0) and np.any(dx[:, t] != 0)


@pytest.mark.parametrize('reversible', [False, True])
def test_longformer_cls_token_is_global_and_sees_the_whole_input(reversible):
  # Window 2 and one layer: without a global CLS, the pooled output would not
  # depend on tokens beyond position 2.
  model = make('classification', 'longformer', {'longformer': {'window': 2, 'max_global': 1}},
               pooling='cls', reversible=reversible)
  embeddings = model.encoder.embed(tokens(jax.random.key(1), (1, 16)))
  pooled = lambda x: model.encoder.encode(x, deterministic=True).sum()
  grads = jax.jit(jax.grad(pooled))(embeddings)
  assert np.all(np.abs(np.asarray(grads[0, 8:])).sum(-1) > 0)
