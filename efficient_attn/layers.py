"""Layers built on the attention registry: MultiHeadAttention, FeedForward,
TransformerBlock and positional encodings."""

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
  """The position-wise MLP of a Transformer block: Dense -> gelu -> dropout -> Dense."""

  def __init__(self, features: int, mlp_dim: int, *, dropout_rate: float = 0.0,
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the two projections.

    Args:
      features: size of the input and output features.
      mlp_dim: size of the hidden layer.
      dropout_rate: dropout on the hidden activations.
      dtype: computation dtype (default: that of the inputs).
      param_dtype: parameter dtype.
      rngs: random streams for parameters and dropout.
    """
    base.check_positive_int('mlp_dim', mlp_dim)
    self.hidden = nnx.Linear(features, mlp_dim, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.dropout = make_dropout('dropout_rate', dropout_rate, rngs)
    self.out = nnx.Linear(mlp_dim, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    """`[..., features]` -> `[..., features]`; `deterministic` and `rngs` as in `nnx.Dropout`."""
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
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
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
    self.mlp = FeedForward(features, mlp_dim, dropout_rate=dropout_rate, **layer_options)
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
    keys = split_rngs(rngs, 4)
    y = self.attention(self.attention_norm(x), mask=mask, causal=causal,
                       deterministic=deterministic, rngs=keys[0], **attention_kwargs)
    x = x + self.attention_dropout(y, deterministic=deterministic, rngs=keys[1])
    y = self.mlp(self.mlp_norm(x), deterministic=deterministic, rngs=keys[2])
    return x + self.mlp_dropout(y, deterministic=deterministic, rngs=keys[3])


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
