"""Layers built on the attention registry: MultiHeadAttention."""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base


class MultiHeadAttention(nnx.Module):
  """Multi-head attention: q/k/v projections, any registered attention, output projection.

  Dropout, when `dropout_rate > 0`, is applied to the attention output before the
  output projection (efficient mechanisms never materialise attention weights to
  drop). `model.eval()` turns it off.
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

    self.query = projection(in_features)
    self.key = projection(context_features)
    self.value = projection(context_features)
    self.out = nnx.LinearGeneral((num_heads, head_dim), out_features, axis=(-2, -1),
                                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.attention = base.make_attention(attention, rngs=rngs, **(attention_options or {}))
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs if dropout_rate else None)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               mask: jax.Array | None = None, causal: bool = False,
               **attention_kwargs) -> jax.Array:
    """Attends from `x` to itself, or to `context` for cross-attention.

    Args:
      x: `[batch, length, in_features]`.
      context: None for self-attention, or `[batch, context_length, context_features]`.
      mask: None or bool `[batch, key_length]`, True for real (non-padding) keys.
      causal: position i attends to positions <= i only.
      **attention_kwargs: extra call arguments of the mechanism (e.g. `global_mask`
        for 'longformer').

    Returns:
      `[batch, length, out_features]`.
    """
    if x.ndim != 3:
      raise ValueError(f'x must have shape [batch, length, features], got {x.shape}')
    context = x if context is None else context
    if context.ndim != 3 or context.shape[0] != x.shape[0]:
      raise ValueError(
          f'context must have shape [batch={x.shape[0]}, length, features], got {context.shape}')
    q, k, v = self.query(x), self.key(context), self.value(context)
    y = self.attention(q, k, v, mask=mask, causal=causal, **attention_kwargs)
    return self.out(self.dropout(y))
