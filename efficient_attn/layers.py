"""Layers built on the attention registry: MultiHeadAttention."""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base


class MultiHeadAttention(nnx.Module):
  """Multi-head attention: q/k/v projections, any registered attention, output projection.

  Dropout, when `dropout_rate > 0`, is applied to the attention output before the
  output projection (efficient mechanisms never materialise attention weights to
  drop). Randomness (dropout, LSH rotations, redrawn Performer features) follows
  the call's `deterministic` and `rngs`, else the module's state (`.eval()`
  turns it off); see `base.RandomAttention`.
  """

  def __init__(self, num_heads: int, in_features: int, *, qkv_features: int | None = None,
               out_features: int | None = None, context_features: int | None = None,
               attention: str = 'full', attention_options: dict | None = None,
               dropout_rate: float = 0.0, use_bias: bool = True,
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
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}')
    head_dim = qkv_features // num_heads
    self.num_heads = num_heads
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
    dropout_stream = None
    if dropout_rate:
      dropout_stream = base.random_stream(rngs, ('dropout',) + base.RANDOM_STREAMS)
    self.dropout = nnx.Dropout(dropout_rate, rngs=dropout_stream)

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
    attention_rngs = dropout_rngs = rngs
    if rngs is not None and not isinstance(rngs, (nnx.Rngs, nnx.RngStream)):
      attention_rngs, dropout_rngs = jax.random.split(base.as_key(rngs))
    q, v = self.query(x), self.value(context)
    k = q if self.key is None else self.key(context)
    y = self.attention(q, k, v, mask=mask, causal=causal, deterministic=deterministic,
                       rngs=attention_rngs, **attention_kwargs)
    return self.out(self.dropout(y, deterministic=deterministic, rngs=dropout_rngs))
