"""Layers built on the attention registry: MultiHeadAttention, FeedForward,
TransformerBlock, ReversibleBlock (and its stack) and positional encodings."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base

# Positional encodings: added to the token embeddings ('sinusoidal', 'learned'),
# applied to queries and keys inside attention ('rotary'), or none.
POS_ENCODINGS = ('sinusoidal', 'learned', 'rotary', 'none')


def sinusoidal_positions(length: int, features: int, max_wavelength: float = 10000.0) -> jax.Array:
  """The float32 sinusoidal encoding `[length, features]` (Vaswani et al. 2017, sec. 3.5).

  Args:
    length: number of positions, 0 .. length - 1.
    features: encoding size; feature 2i is sin(pos / max_wavelength^(2i / features)),
      feature 2i + 1 the cosine of the same angle.
    max_wavelength: the longest wavelength, 10000 in the paper.

  Returns:
    float32 `[length, features]`.
  """
  pairs = -(-features // 2)
  inverse_wavelengths = max_wavelength ** (-2.0 * jnp.arange(pairs) / features)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inverse_wavelengths
  encoding = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return encoding.reshape(length, 2 * pairs)[:, :features]


def rotary_embedding(x: jax.Array, positions: jax.Array | None = None,
                     max_wavelength: float = 10000.0) -> jax.Array:
  """Rotates feature pairs of queries or keys by their position (RoFormer, Su et al. 2021).

  Features (2i, 2i + 1) of the token at position p are rotated by the angle
  p * theta_i with theta_i = max_wavelength^(-2i / head_dim) (eq. 34), so the
  dot product of a rotated query and key depends on their positions only
  through the offset between them.

  Args:
    x: `[batch, length, heads, head_dim]` with an even head_dim.
    positions: None for 0 .. length - 1, or int `[length]` or `[batch, length]`.
    max_wavelength: 10000 in the paper.

  Returns:
    The rotated `x`, same shape and dtype (angles computed in float32).
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f'rotary_embedding needs an even head_dim, got {head_dim}')
  if positions is None:
    positions = jnp.arange(x.shape[1])
  theta = max_wavelength ** (-2.0 * jnp.arange(head_dim // 2) / head_dim)
  angles = jnp.asarray(positions, jnp.float32)[..., None, None] * theta  # [.., length, 1, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // 2, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def split_rngs(rngs, n: int) -> tuple:
  """`n` call-time rngs from one: split when it is a key; None or an `nnx.Rngs` is shared
  (each draw from it advances it)."""
  if rngs is None or isinstance(rngs, (nnx.Rngs, nnx.RngStream)):
    return (rngs,) * n
  return tuple(jax.random.split(base.as_key(rngs), n))


def make_dropout(argument: str, rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """An `nnx.Dropout`, with its own stream ('dropout', else a random stream) when rate > 0.

  Args:
    argument: name of the rate in error messages.
    rate: dropout rate in [0, 1).
    rngs: the module's random streams.

  Returns:
    The dropout layer.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'{argument} must be in [0, 1), got {rate}')
  stream = base.random_stream(rngs, ('dropout',) + base.RANDOM_STREAMS) if rate else None
  return nnx.Dropout(rate, rngs=stream)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention: q/k/v projections, any registered attention, output projection.

  Dropout, when `dropout_rate > 0`, is applied to the attention output before the
  output projection (efficient mechanisms never materialise attention weights to
  drop). Randomness (dropout, LSH rotations, redrawn Performer features) follows
  the call's `deterministic` and `rngs`, else the module's state (`.eval()`
  turns it off); see `base.RandomAttention`. With `rotary=True` queries and keys
  get `rotary_embedding` (positions 0 .. length - 1) after the projections, so
  it works with every mechanism.
  """

  def __init__(self, num_heads: int, in_features: int, *, qkv_features: int | None = None,
               out_features: int | None = None, context_features: int | None = None,
               attention: str = 'full', attention_options: dict | None = None,
               dropout_rate: float = 0.0, rotary: bool = False, use_bias: bool = True,
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the projections and the attention mechanism.

    Args:
      num_heads: number of heads; must divide `qkv_features`.
      in_features: size of the input (query side) features.
      qkv_features: total size of queries/keys/values over all heads (default in_features).
      out_features: size of the output (default in_features).
      context_features: size of the context features for cross-attention
        (default in_features).
      attention: name of a registered mechanism, see `available_attentions()`.
      attention_options: options of that mechanism, e.g. {'window': 256}.
      dropout_rate: dropout on the attention output.
      rotary: apply rotary position embeddings to queries and keys.
      use_bias: whether the projections have biases.
      dtype: computation dtype (default: that of the inputs).
      param_dtype: parameter dtype.
      rngs: random streams for parameters, dropout and random features.
    """
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    context_features = in_features if context_features is None else context_features
    base.check_positive_int('num_heads', num_heads)
    if qkv_features % num_heads:
      raise ValueError(
          f'qkv_features={qkv_features} must be divisible by num_heads={num_heads}')
    head_dim = qkv_features // num_heads
    base.check_choice('rotary', rotary, (False, True))
    if rotary and head_dim % 2:
      raise ValueError(
          f'rotary=True needs an even head dimension, got qkv_features={qkv_features} / '
          f'num_heads={num_heads} = {head_dim}')
    self.num_heads = num_heads
    self.rotary = rotary
    self.dtype = dtype

    def projection(features):
      return nnx.LinearGeneral(features, (num_heads, head_dim), use_bias=use_bias,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.attention = base.make_attention(attention, rngs=rngs, **(attention_options or {}))
    self.query = projection(in_features)
    # Mechanisms that derive keys from the queries (shared-QK LSH) get no key projection.
    self.key = projection(context_features) if self.attention.uses_keys else None
    self.value = projection(context_features)
    self.out = nnx.LinearGeneral((num_heads, head_dim), out_features, axis=(-2, -1),
                                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.dropout = make_dropout('dropout_rate', dropout_rate, rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, causal: bool = False,
               deterministic: bool | None = None, rngs=None,
               **attention_kwargs) -> jax.Array:
    """Attends from `x` to itself, or to `context` for cross-attention.

    Args:
      x: `[batch, length, in_features]`.
      context: None for self-attention, or `[batch, context_length, context_features]`.
      mask: None or bool `[batch, key_length]`, True for real (non-padding) keys.
      causal: position i attends to positions <= i only.
      deterministic: True for no dropout and the attention's fixed random state;
        None for the module's own setting (`.eval()` / `.train()`).
      rngs: None, a jax key or an `nnx.Rngs` to draw dropout and the attention's
        random parts from, leaving the module's state untouched (needed under
        plain `jax.jit` / `jax.grad` when not deterministic).
      **attention_kwargs: extra call arguments of the mechanism (e.g. `global_mask`
        for 'longformer').

    Returns:
      `[batch, length, out_features]`.
    """
    if x.ndim != 3:
      raise ValueError(f'x must have shape [batch, length, features], got {x.shape}')
    if context is not None and self.key is None:
      raise ValueError(
          f'attention {self.attention.name!r} with these options derives keys from the '
          'queries (shared_qk=True), so it cannot attend to a context; use shared_qk=False')
    context = x if context is None else context
    if context.ndim != 3 or context.shape[0] != x.shape[0]:
      raise ValueError(
          f'context must have shape [batch={x.shape[0]}, length, features], got {context.shape}')
    attention_rngs, dropout_rngs = split_rngs(rngs, 2)
    position = rotary_embedding if self.rotary else lambda y: y
    q, v = position(self.query(x)), self.value(context)
    k = q if self.key is None else position(self.key(context))
    y = self.attention(q, k, v, mask=mask, causal=causal, deterministic=deterministic,
                       rngs=attention_rngs, **attention_kwargs)
    return self.out(self.dropout(y, deterministic=deterministic, rngs=dropout_rngs))


class FeedForward(nnx.Module):
  """The position-wise MLP of a Transformer block: Dense -> gelu -> dropout -> Dense.

  With `chunk_size`, positions go through the MLP `chunk_size` at a time (Reformer,
  Kitaev et al. 2020, sec. 3 "Chunking"), each chunk under `jax.checkpoint`, so the
  `[length, mlp_dim]` hidden activation is never whole in the forward or the
  backward pass (the backward recomputes each chunk's hidden activation). The
  result is the unchunked one; dropout inside the MLP then draws one mask per
  chunk (from the call's key folded with the chunk index) instead of one for all.
  """

  def __init__(self, features: int, mlp_dim: int, *, dropout_rate: float = 0.0,
               chunk_size: int | None = None, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Builds the two projections.

    Args:
      features: size of the input and output features.
      mlp_dim: size of the hidden layer.
      dropout_rate: dropout on the hidden activations.
      chunk_size: None for all positions at once, else positions per chunk.
      dtype: computation dtype (default: that of the inputs).
      param_dtype: parameter dtype.
      rngs: random streams for parameters and dropout.
    """
    base.check_positive_int('mlp_dim', mlp_dim)
    if chunk_size is not None:
      base.check_positive_int('chunk_size (ff_chunk_size)', chunk_size)
    self.chunk_size = chunk_size
    self.hidden = nnx.Linear(features, mlp_dim, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.dropout = make_dropout('dropout_rate', dropout_rate, rngs)
    self.out = nnx.Linear(mlp_dim, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    """`[..., length, features]` -> the same shape; `deterministic` and `rngs` as in
    `nnx.Dropout`."""
    if self.chunk_size is None or x.shape[-2] <= self.chunk_size:
      return self.mlp(x, deterministic=deterministic, rngs=rngs)
    length = x.shape[-2]
    dropout = self.dropout
    if dropout.rate and not (dropout.deterministic if deterministic is None else deterministic):
      # One key drawn here, outside the loop, where the module's stream may advance.
      rngs = dropout.rngs() if rngs is None else base.as_key(rngs, ('dropout',) +
                                                             base.RANDOM_STREAMS)
    else:
      rngs = None
    chunks = base.pad_axis(x, x.ndim - 2, self.chunk_size)
    chunks = chunks.reshape(*x.shape[:-2], -1, self.chunk_size, x.shape[-1])
    chunks = jnp.moveaxis(chunks, -3, 0)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_mlp(inputs):
      index, chunk = inputs
      key = None if rngs is None else jax.random.fold_in(rngs, index)
      return self.mlp(chunk, deterministic=deterministic, rngs=key)

    y = jax.lax.map(chunk_mlp, (jnp.arange(chunks.shape[0]), chunks))
    y = jnp.moveaxis(y, 0, -3).reshape(*x.shape[:-2], -1, y.shape[-1])
    return y[..., :length, :]

  def mlp(self, x: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    """The MLP on all positions of `x` at once."""
    h = jax.nn.gelu(self.hidden(x))
    return self.out(self.dropout(h, deterministic=deterministic, rngs=rngs))


class TransformerBlock(nnx.Module):
  """A pre-LayerNorm Transformer block: x + attention(norm(x)), then x + mlp(norm(x)).

  Each residual branch ends in dropout (`dropout_rate`); the attention is any
  registered mechanism, built by `MultiHeadAttention` from its name and options.
  """

  def __init__(self, features: int, num_heads: int, mlp_dim: int, *,
               qkv_features: int | None = None, dropout_rate: float = 0.0,
               attention_dropout_rate: float = 0.0, attention: str = 'full',
               attention_options: dict | None = None, rotary: bool = False,
               ff_chunk_size: int | None = None, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Builds the norms, the attention and the MLP.

    Args:
      features: size of the input and output features.
      num_heads: number of attention heads; must divide `qkv_features`.
      mlp_dim: size of the MLP's hidden layer.
      qkv_features: total size of queries/keys/values (default `features`).
      dropout_rate: dropout at the end of each residual branch and inside the MLP.
      attention_dropout_rate: dropout on the attention output (see `MultiHeadAttention`).
      attention: name of a registered mechanism, see `available_attentions()`.
      attention_options: options of that mechanism.
      rotary: rotary position embeddings on queries and keys.
      ff_chunk_size: None, or positions per chunk of the MLP (see `FeedForward`).
      dtype: computation dtype (default: that of the inputs).
      param_dtype: parameter dtype.
      rngs: random streams for parameters, dropout and random features.
    """
    layer_options = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(features, **layer_options)
    self.attention = MultiHeadAttention(
        num_heads, features, qkv_features=qkv_features, attention=attention,
        attention_options=attention_options, dropout_rate=attention_dropout_rate,
        rotary=rotary, **layer_options)
    self.attention_dropout = make_dropout('dropout_rate', dropout_rate, rngs)
    self.mlp_norm = nnx.LayerNorm(features, **layer_options)
    self.mlp = FeedForward(features, mlp_dim, dropout_rate=dropout_rate,
                           chunk_size=ff_chunk_size, **layer_options)
    self.mlp_dropout = make_dropout('dropout_rate', dropout_rate, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, causal: bool = False,
               deterministic: bool | None = None, rngs=None,
               **attention_kwargs) -> jax.Array:
    """Applies the block to a sequence.

    Args:
      x: `[batch, length, features]`.
      mask: None or bool `[batch, length]`, True for real (non-padding) tokens.
      causal: position i attends to positions <= i only.
      deterministic: True for no dropout and the attention's fixed random state;
        None for the module's own setting (`.eval()` / `.train()`).
      rngs: None, a jax key or an `nnx.Rngs` for dropout and random attention
        parts, leaving module state untouched (see `MultiHeadAttention`).
      **attention_kwargs: extra call arguments of the mechanism.

    Returns:
      `[batch, length, features]`.
    """
    attention_rngs, mlp_rngs = split_rngs(rngs, 2)
    x = x + self.attention_branch(x, mask, causal=causal, deterministic=deterministic,
                                  rngs=attention_rngs, **attention_kwargs)
    return x + self.mlp_branch(x, deterministic=deterministic, rngs=mlp_rngs)

  def attention_branch(self, x: jax.Array, mask: jax.Array | None = None, *,
                       causal: bool = False, deterministic: bool | None = None, rngs=None,
                       **attention_kwargs) -> jax.Array:
    """The attention residual branch, dropout(attention(norm(x))); arguments as `__call__`."""
    attention_rngs, dropout_rngs = split_rngs(rngs, 2)
    y = self.attention(self.attention_norm(x), mask=mask, causal=causal,
                       deterministic=deterministic, rngs=attention_rngs, **attention_kwargs)
    return self.attention_dropout(y, deterministic=deterministic, rngs=dropout_rngs)

  def mlp_branch(self, x: jax.Array, *, deterministic: bool | None = None,
                 rngs=None) -> jax.Array:
    """The MLP residual branch, dropout(mlp(norm(x))); arguments as `__call__`."""
    mlp_rngs, dropout_rngs = split_rngs(rngs, 2)
    y = self.mlp(self.mlp_norm(x), deterministic=deterministic, rngs=mlp_rngs)
    return self.mlp_dropout(y, deterministic=deterministic, rngs=dropout_rngs)


class ReversibleBlock(TransformerBlock):
  """A reversible residual block (RevNet, Gomez et al. 2017, eq. 1-2; Reformer, Kitaev
  et al. 2020, sec. 3) on two streams of activations (x1, x2):

    y1 = x1 + Attention(x2),  y2 = x2 + FeedForward(y1),

  where Attention and FeedForward are `TransformerBlock`'s two residual branches
  (pre-LayerNorm, dropout at the end). The inputs follow from the outputs,
  x2 = y2 - FeedForward(y1) and x1 = y1 - Attention(x2), which is what
  `reversible_sequence` uses to backpropagate without storing activations.
  Arguments of the constructor are those of `TransformerBlock`.
  """

  def __call__(self, x1: jax.Array, x2: jax.Array, mask: jax.Array | None = None, *,
               causal: bool = False, deterministic: bool | None = None,
               rngs=None, **attention_kwargs) -> tuple[jax.Array, jax.Array]:
    """(x1, x2) -> (y1, y2), each `[batch, length, features]`; other arguments as in
    `TransformerBlock`."""
    attention_rngs, mlp_rngs = split_rngs(rngs, 2)
    y1 = x1 + self.attention_branch(x2, mask, causal=causal, deterministic=deterministic,
                                    rngs=attention_rngs, **attention_kwargs)
    y2 = x2 + self.mlp_branch(y1, deterministic=deterministic, rngs=mlp_rngs)
    return y1, y2


def reversible_sequence(blocks, x1: jax.Array, x2: jax.Array, mask: jax.Array | None,
                        keys: jax.Array | None, *, causal: bool, deterministic: bool,
                        attention_kwargs: dict | None = None) -> tuple[jax.Array, jax.Array]:
  """Applies `ReversibleBlock`s in order, with a backward pass that stores no activations.

  The backward pass (Gomez et al. 2017, Algorithm 1) walks the blocks from the
  last one, rebuilding each block's inputs from its outputs while it recomputes
  the two branches under `jax.vjp`; only the final outputs are kept from the
  forward pass, so activation memory does not grow with the number of blocks.
  The blocks' parameters, stacked along a new leading axis, enter the custom VJP
  as explicit arguments (`nnx.split`), and both passes are `lax.scan`s over
  them, which keeps one block's recomputation alive at a time (an unrolled loop
  lets XLA schedule all recomputations first). Each block gets the same key in
  the forward pass and the recomputation, so dropout and random attention parts
  are redrawn identically. The rebuilt inputs equal the real ones up to
  rounding, so gradients match ordinary autodiff to float tolerance (in float32;
  in bfloat16 the rounding accumulates over depth).

  Args:
    blocks: a sequence of `ReversibleBlock`s of one structure (same options).
    x1: first stream `[batch, length, features]`.
    x2: second stream, same shape.
    mask: None or bool `[batch, length]`, True for real tokens.
    keys: None (deterministic), or one typed key per block `[len(blocks)]`.
    causal: position i attends to positions <= i only.
    deterministic: True for no dropout and the attentions' fixed random state.
    attention_kwargs: extra call arguments of the mechanism (arrays without
      gradient, e.g. Longformer's `global_mask`).

  Returns:
    The last block's (y1, y2).
  """
  graphdefs, params, rest = zip(*(nnx.split(block, nnx.Param, ...) for block in blocks))
  if any(graphdef != graphdefs[0] for graphdef in graphdefs):
    raise ValueError('reversible_sequence needs blocks of one structure (the same options)')
  graphdef = graphdefs[0]
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  options = dict(causal=causal, deterministic=deterministic)

  def forward(context, carry, layer):
    (x1, x2), (params, rest, key), (mask, extra) = carry, layer, context
    block = nnx.merge(graphdef, params, rest)
    y = block(x1, x2, mask, rngs=key, **options, **extra)
    after = jax.tree.leaves(nnx.state(block, nnx.Not(nnx.Param)))
    if any(a is not b for a, b in zip(jax.tree.leaves(rest), after)):
      raise ValueError(
          'a reversible block changed its non-parameter state (e.g. a running average or '
          'an rng stream), which its recomputation cannot reproduce; use reversible=False '
          'with this attention')
    return y, None

  def backward(context, carry, layer):
    (y1, y2, dy1, dy2), (params, rest, key), (mask, extra) = carry, layer, context
    merged = lambda p: nnx.merge(graphdef, p, rest)
    attention_rngs, mlp_rngs = split_rngs(key, 2)
    mlp = lambda p, y1: merged(p).mlp_branch(y1, deterministic=deterministic, rngs=mlp_rngs)
    attention = lambda p, x2: merged(p).attention_branch(x2, mask, rngs=attention_rngs,
                                                         **options, **extra)
    g, mlp_vjp = jax.vjp(mlp, params, y1)
    x2 = y2 - g
    dmlp, dy1_through_mlp = mlp_vjp(dy2)
    dy1 = dy1 + dy1_through_mlp
    f, attention_vjp = jax.vjp(attention, params, x2)
    x1 = y1 - f
    dattention, dx2 = attention_vjp(dy1)
    return (x1, x2, dy1, dy2 + dx2), jax.tree.map(jnp.add, dmlp, dattention)

  @jax.custom_vjp
  def run(params, rest, x1, x2, context, keys):
    return jax.lax.scan(functools.partial(forward, context), (x1, x2),
                        (params, rest, keys))[0]

  def run_forward(params, rest, x1, x2, context, keys):
    y = run(params, rest, x1, x2, context, keys)
    return y, (params, rest, y, context, keys)

  def run_backward(residuals, cotangents):
    params, rest, y, context, keys = residuals
    (_, _, dx1, dx2), dparams = jax.lax.scan(
        functools.partial(backward, context), (*y, *cotangents), (params, rest, keys),
        reverse=True)
    return dparams, None, dx1, dx2, None, None

  run.defvjp(run_forward, run_backward)
  return run(stack(params), stack(rest), x1, x2, (mask, attention_kwargs or {}), keys)


class ReversibleStack(nnx.Module):
  """`ReversibleBlock`s on two copies of the input, their two output streams averaged.

  As the Reformer encoder of trax (`tl.Dup()`, `tl.ReversibleSerial`, then the
  mean of both streams) and reformer-pytorch (input concatenated with itself,
  then the mean of the halves): each stream has the full feature size, and
  the average keeps it, so the stack replaces a list of `TransformerBlock`s
  in place. Backward as `reversible_sequence`.
  """

  def __init__(self, num_layers: int, features: int, num_heads: int, mlp_dim: int, *,
               rngs: nnx.Rngs, **block_options):
    """Builds the blocks.

    Args:
      num_layers: number of blocks.
      features: size of the input and output features.
      num_heads: number of attention heads.
      mlp_dim: size of the MLP's hidden layer.
      rngs: random streams for parameters, dropout and random attention parts.
      **block_options: the other arguments of `TransformerBlock`.
    """
    base.check_positive_int('num_layers', num_layers)
    self.blocks = nnx.List([ReversibleBlock(features, num_heads, mlp_dim, rngs=rngs,
                                            **block_options) for _ in range(num_layers)])
    self.deterministic = False
    # Whether a call needs keys: dropout or a random attention somewhere in a block.
    self.needs_keys = any(isinstance(m, base.RandomAttention) or
                      (isinstance(m, nnx.Dropout) and m.rate > 0)
                      for _, m in nnx.iter_modules(self.blocks[0]))
    self.rngs = base.random_stream(rngs, ('dropout',) + base.RANDOM_STREAMS)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, causal: bool = False,
               deterministic: bool | None = None, rngs=None,
               **attention_kwargs) -> jax.Array:
    """Applies the blocks to a sequence.

    Args:
      x: `[batch, length, features]`.
      mask: None or bool `[batch, length]`, True for real (non-padding) tokens.
      causal: position i attends to positions <= i only.
      deterministic: True for no dropout and the attentions' fixed random state;
        None for this module's setting (`.eval()` / `.train()`).
      rngs: None (the module's own stream), a jax key or an `nnx.Rngs`; one key
        is drawn from it and split into one key per block (none without dropout
        or random attention).
      **attention_kwargs: extra call arguments of the mechanism (no gradient).

    Returns:
      `[batch, length, features]`.
    """
    deterministic = self.deterministic if deterministic is None else deterministic
    keys = None
    if self.needs_keys and not deterministic:
      key = self.rngs() if rngs is None else base.as_key(rngs, ('dropout',) +
                                                         base.RANDOM_STREAMS)
      keys = jax.random.split(key, len(self.blocks))
    y1, y2 = reversible_sequence(list(self.blocks), x, x, mask, keys, causal=causal,
                                 deterministic=deterministic,
                                 attention_kwargs=attention_kwargs)
    return (y1 + y2) / 2


class PositionalEncoding(nnx.Module):
  """Adds 'sinusoidal' or 'learned' position embeddings; identity for 'rotary'
  (applied inside attention, see `MultiHeadAttention`) and 'none'."""

  def __init__(self, kind: str, max_len: int, features: int, *,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Builds the encoding.

    Args:
      kind: one of `POS_ENCODINGS`.
      max_len: longest sequence; 'learned' has one embedding per position, the
        others accept any length.
      features: size of the embeddings.
      param_dtype: dtype of learned embeddings.
      rngs: random streams; 'params' initialises learned embeddings.
    """
    base.check_choice('pos_encoding', kind, POS_ENCODINGS)
    base.check_positive_int('max_len', max_len)
    self.kind = kind
    self.max_len = max_len
    init = jax.nn.initializers.normal(stddev=0.02)
    self.embedding = (nnx.Param(init(rngs.params(), (max_len, features), param_dtype))
                      if kind == 'learned' else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x` `[batch, length, features]` with the positions 0 .. length - 1 added."""
    length = x.shape[1]
    if self.kind == 'learned':
      if length > self.max_len:
        raise ValueError(
            f'sequence length {length} is longer than max_len={self.max_len} of the learned '
            f'positions; allowed: lengths <= {self.max_len}')
      return x + self.embedding[:length].astype(x.dtype)
    if self.kind == 'sinusoidal':
      return x + sinusoidal_positions(length, x.shape[-1]).astype(x.dtype)
    return x
