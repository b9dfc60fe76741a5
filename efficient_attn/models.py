"""Models on the Transformer blocks: Classifier, DualEncoder (Retrieval), LanguageModel.

Every model is called as `model(batch, *, deterministic=None, rngs=None)` on a
batch dict of `efficient_attn.data.pipeline.make_batches`:
  Classifier     'inputs', 'mask' `[batch, seq_len]` -> logits `[batch, num_classes]`
  DualEncoder    'inputs1', 'mask1', 'inputs2', 'mask2' -> logits `[batch, num_classes]`
  LanguageModel  'inputs', 'mask' -> next-token logits `[batch, seq_len, vocab_size]`
Logits are float32 whatever the compute dtype. `deterministic=True` turns off
dropout and uses the attention's fixed random state; `rngs` (a jax key or an
`nnx.Rngs`) draws dropout and random attention parts without touching module
state, as needed under plain `jax.jit` / `jax.grad`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn import layers
from efficient_attn.attention import base

POOLINGS = ('mean', 'cls')


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of `x` `[batch, length, features]` over the positions where `mask` is True.

  Padding is left out (the Long Range Arena code averaged it in); a row with no
  real token gives zeros.
  """
  weights = mask.astype(x.dtype)[..., None]
  count = jnp.maximum(weights.sum(axis=1), 1)
  return (x * weights).sum(axis=1) / count


class Encoder(nnx.Module):
  """Token embedding, positional encoding, dropout, TransformerBlocks (or a
  ReversibleStack) and a final LayerNorm, optionally pooled to one vector per example."""

  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int = 2,
               emb_dim: int = 128, num_heads: int = 4, qkv_dim: int | None = None,
               mlp_dim: int = 512, dropout_rate: float = 0.1,
               attention_dropout_rate: float = 0.1, attention: str = 'full',
               attention_options: dict | None = None, pos_encoding: str = 'sinusoidal',
               pooling: str | None = None, causal: bool = False, reversible: bool = False,
               ff_chunk_size: int | None = None, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Builds the encoder; errors in the arguments raise ValueError here.

    Args:
      vocab_size: number of token ids, padding id 0 included.
      max_len: longest input sequence (learned positions have one embedding per
        position; the other encodings accept any length).
      num_layers: number of TransformerBlocks.
      emb_dim: size of the token embeddings and of the blocks' features.
      num_heads: number of attention heads.
      qkv_dim: total size of queries/keys/values (default emb_dim); must be
        divisible by num_heads.
      mlp_dim: size of the MLP's hidden layer in each block.
      dropout_rate: dropout after the embeddings, inside the MLPs and at the end
        of each residual branch.
      attention_dropout_rate: dropout on the attention outputs.
      attention: name of a registered mechanism, see `available_attentions()`.
      attention_options: options of that mechanism, e.g. {'window': 64}. With
        'cls' pooling attention sees max_len + 1 positions (matters for
        Linformer's `max_len`).
      pos_encoding: one of `layers.POS_ENCODINGS`: 'sinusoidal', 'learned',
        'rotary' or 'none'.
      pooling: None (return the sequence), 'mean' (masked mean over real
        tokens) or 'cls' (the output of a learned CLS token, prepended to the
        embedded sequence without a position; a global token of mechanisms
        that take them, e.g. Longformer, so that it sees the whole input).
      causal: each position attends to itself and earlier positions only.
      reversible: `layers.ReversibleStack` instead of TransformerBlocks (Reformer):
        activation memory that does not grow with num_layers, for about one
        more forward pass of compute in the backward pass.
      ff_chunk_size: None, or positions per chunk of the MLPs (see
        `layers.FeedForward`).
      dtype: computation dtype, e.g. jnp.bfloat16 (default: float32 from the
        float32 embeddings).
      param_dtype: parameter dtype.
      rngs: random streams for parameters, dropout and random attention parts.
    """
    base.check_positive_int('vocab_size', vocab_size)
    base.check_positive_int('num_layers', num_layers)
    base.check_positive_int('emb_dim', emb_dim)
    base.check_positive_int('num_heads', num_heads)
    if qkv_dim is None:
      if emb_dim % num_heads:
        raise ValueError(f'emb_dim={emb_dim} must be divisible by num_heads={num_heads} '
                         '(qkv_dim defaults to emb_dim)')
      qkv_dim = emb_dim
    elif qkv_dim % num_heads:
      raise ValueError(f'qkv_dim={qkv_dim} must be divisible by num_heads={num_heads}')
    base.check_choice('pooling', pooling, (None,) + POOLINGS)
    base.check_choice('causal', causal, (False, True))
    base.check_choice('reversible', reversible, (False, True))
    if causal and not base.attention_class(attention).supports_causal:
      can = [name for name in base.available_attentions()
             if base.attention_class(name).supports_causal]
      raise ValueError(f'attention={attention!r} cannot be causal, which this model needs; '
                       f'allowed: {", ".join(map(repr, can))}')
    self.emb_dim = emb_dim
    self.mlp_dim = mlp_dim
    self.vocab_size = vocab_size
    self.causal = causal
    self.pooling = pooling
    self.global_cls = base.attention_class(attention).global_tokens
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.embed = nnx.Embed(vocab_size, emb_dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    self.positions = layers.PositionalEncoding(pos_encoding, max_len, emb_dim,
                                               param_dtype=param_dtype, rngs=rngs)
    init = jax.nn.initializers.normal(stddev=0.02)
    self.cls = (nnx.Param(init(rngs.params(), (emb_dim,), param_dtype))
                if pooling == 'cls' else None)
    self.dropout = layers.make_dropout('dropout_rate', dropout_rate, rngs)
    block_options = dict(
        qkv_features=qkv_dim, dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate, attention=attention,
        attention_options=attention_options, rotary=pos_encoding == 'rotary',
        ff_chunk_size=ff_chunk_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.reversible = reversible
    if reversible:
      self.blocks = layers.ReversibleStack(num_layers, emb_dim, num_heads, mlp_dim,
                                           **block_options)
    else:
      self.blocks = nnx.List([layers.TransformerBlock(emb_dim, num_heads, mlp_dim,
                                                      **block_options)
                              for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(emb_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, inputs: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool | None = None, rngs=None) -> jax.Array:
    """Encodes token ids.

    Args:
      inputs: int `[batch, length]` token ids.
      mask: None (all real) or bool `[batch, length]`, True for real tokens.
      deterministic: True for no dropout and fixed attention randomness; None
        for the module's own setting (`.eval()` / `.train()`).
      rngs: None, a jax key or an `nnx.Rngs` for dropout and random attention parts.

    Returns:
      `[batch, emb_dim]` when pooled, else `[batch, length, emb_dim]`.
    """
    if not hasattr(inputs, 'ndim') or inputs.ndim != 2 or not jnp.issubdtype(
        inputs.dtype, jnp.integer):
      raise ValueError(f'inputs must be int token ids [batch, length], got '
                       f'{getattr(inputs, "dtype", type(inputs).__name__)} '
                       f'{getattr(inputs, "shape", "")}')
    return self.encode(self.embed(inputs), mask, deterministic=deterministic, rngs=rngs)

  def encode(self, x: jax.Array, mask: jax.Array | None = None, *,
             deterministic: bool | None = None, rngs=None) -> jax.Array:
    """As `__call__`, from token embeddings `x` `[batch, length, emb_dim]`."""
    batch, length = x.shape[:2]
    if mask is None:
      mask = jnp.ones((batch, length), bool)
    if mask.shape != (batch, length) or mask.dtype != jnp.bool_:
      raise ValueError(f'mask must be bool [batch, length] = {(batch, length)}, '
                       f'got {mask.dtype} {mask.shape}')
    dropout_rngs, block_rngs = layers.split_rngs(rngs, 2)
    x = self.positions(x)
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (batch, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
      mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
    x = self.dropout(x, deterministic=deterministic, rngs=dropout_rngs)
    extra = {}
    if self.cls is not None and self.global_cls:
      # The CLS token attends to all tokens and all to it (Beltagy et al. 2020, Sec. 3.1).
      extra['global_mask'] = jnp.arange(x.shape[1])[None, :] == jnp.zeros((batch, 1), int)
    if self.reversible:
      x = self.blocks(x, mask, causal=self.causal, deterministic=deterministic,
                      rngs=block_rngs, **extra)
    else:
      for block, key in zip(self.blocks, layers.split_rngs(block_rngs, len(self.blocks))):
        x = block(x, mask, causal=self.causal, deterministic=deterministic, rngs=key,
                  **extra)
    x = self.norm(x)
    if self.pooling == 'cls':
      return x[:, 0]
    if self.pooling == 'mean':
      return masked_mean(x, mask)
    return x


class ClassifierHead(nnx.Module):
  """The MLP head of the Long Range Arena classifiers: (Dense -> relu) per hidden size,
  then Dense to the logits."""

  def __init__(self, in_features: int, hidden_dims: tuple[int, ...], num_classes: int, *,
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the layers, sizes in_features -> *hidden_dims -> num_classes."""
    base.check_positive_int('num_classes', num_classes)
    options = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    sizes = (in_features,) + tuple(hidden_dims)
    self.hidden = nnx.List([nnx.Linear(a, b, **options) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_classes, **options)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float32 logits `[batch, num_classes]` from features `[batch, in_features]`."""
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.out(x).astype(jnp.float32)


class Classifier(nnx.Module):
  """Sequence classifier: an `Encoder` pooled over real tokens, then an MLP head."""

  def __init__(self, *, num_classes: int, pooling: str = 'mean', rngs: nnx.Rngs,
               **encoder_options):
    """Builds the encoder and head.

    Args:
      num_classes: number of classes.
      pooling: 'mean' (masked mean over real tokens) or 'cls' (a CLS token).
      rngs: random streams for parameters, dropout and random attention parts.
      **encoder_options: the arguments of `Encoder` (vocab_size, max_len,
        num_layers, emb_dim, num_heads, qkv_dim, mlp_dim, dropout_rate,
        attention_dropout_rate, attention, attention_options, pos_encoding,
        reversible, ff_chunk_size, dtype, param_dtype).
    """
    base.check_choice('pooling', pooling, POOLINGS)
    self.encoder = Encoder(pooling=pooling, rngs=rngs, **encoder_options)
    mlp_dim = self.encoder.mlp_dim
    self.head = ClassifierHead(self.encoder.emb_dim, (mlp_dim,), num_classes,
                               dtype=self.encoder.dtype,
                               param_dtype=self.encoder.param_dtype, rngs=rngs)

  def __call__(self, batch: dict, *, deterministic: bool | None = None,
               rngs=None) -> jax.Array:
    """float32 logits `[batch, num_classes]` from batch 'inputs' and 'mask'."""
    pooled = self.encoder(batch['inputs'], batch['mask'], deterministic=deterministic,
                          rngs=rngs)
    return self.head(pooled)


class DualEncoder(nnx.Module):
  """Pair classifier (Retrieval): one shared `Encoder` for both inputs u and v, and the
  Long Range Arena combination [u, v, u * v, u - v] into an MLP head."""

  def __init__(self, *, num_classes: int, pooling: str = 'mean', rngs: nnx.Rngs,
               **encoder_options):
    """Builds the encoder and head; arguments as in `Classifier`."""
    base.check_choice('pooling', pooling, POOLINGS)
    self.encoder = Encoder(pooling=pooling, rngs=rngs, **encoder_options)
    # As the Long Range Arena dual-encoder head: hidden sizes mlp_dim and mlp_dim // 2.
    mlp_dim = self.encoder.mlp_dim
    self.head = ClassifierHead(4 * self.encoder.emb_dim, (mlp_dim, mlp_dim // 2), num_classes,
                               dtype=self.encoder.dtype,
                               param_dtype=self.encoder.param_dtype, rngs=rngs)

  def __call__(self, batch: dict, *, deterministic: bool | None = None,
               rngs=None) -> jax.Array:
    """float32 logits `[batch, num_classes]` from 'inputs1', 'mask1', 'inputs2', 'mask2'."""
    if batch['inputs1'].shape != batch['inputs2'].shape:
      raise ValueError(f"inputs1 and inputs2 must have one shape, got "
                       f"{batch['inputs1'].shape} and {batch['inputs2'].shape}")
    # Both inputs in one encoder call: [2 * batch, length].
    inputs = jnp.concatenate([batch['inputs1'], batch['inputs2']])
    mask = jnp.concatenate([batch['mask1'], batch['mask2']])
    u, v = jnp.split(self.encoder(inputs, mask, deterministic=deterministic, rngs=rngs), 2)
    return self.head(jnp.concatenate([u, v, u * v, u - v], axis=-1))


class LanguageModel(nnx.Module):
  """Causal language model: a causal `Encoder` and a projection to next-token logits."""

  def __init__(self, *, rngs: nnx.Rngs, **encoder_options):
    """Builds the encoder and output projection.

    Args:
      rngs: random streams for parameters, dropout and random attention parts.
      **encoder_options: the arguments of `Encoder` but pooling and causal; the
        attention must support causal=True (not 'linformer').
    """
    self.encoder = Encoder(causal=True, pooling=None, rngs=rngs, **encoder_options)
    self.logits = nnx.Linear(self.encoder.emb_dim, self.encoder.vocab_size,
                             dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype,
                             rngs=rngs)

  def __call__(self, batch: dict, *, deterministic: bool | None = None,
               rngs=None) -> jax.Array:
    """float32 logits `[batch, seq_len, vocab_size]`: position t predicts 'targets'[t], the
    token after 'inputs'[t]; logits at padding positions are meaningless (weight the
    loss by 'mask')."""
    x = self.encoder(batch['inputs'], batch['mask'], deterministic=deterministic, rngs=rngs)
    return self.logits(x).astype(jnp.float32)


MODELS = {'classification': Classifier, 'pair_classification': DualEncoder,
          'causal_lm': LanguageModel}


def make_model(task_kind: str, **kwargs) -> nnx.Module:
  """Builds the model of a task kind.

  Args:
    task_kind: 'classification' (Classifier), 'pair_classification'
      (DualEncoder) or 'causal_lm' (LanguageModel); see `task_kind_of`.
    **kwargs: the model's constructor arguments (LanguageModel takes neither
      num_classes, which is its vocab_size, nor pooling).

  Returns:
    The model.
  """
  base.check_choice('task_kind', task_kind, tuple(MODELS))
  return MODELS[task_kind](**kwargs)


def task_kind_of(task) -> str:
  """The task kind of a `efficient_attn.data.common.Task` (its `pair` and `causal_lm` flags)."""
  if task.causal_lm:
    return 'causal_lm'
  return 'pair_classification' if task.pair else 'classification'
