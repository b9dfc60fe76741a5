"""Exact softmax attention, softmax(q k^T / sqrt(d)) v, with several backends."""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base
from efficient_attn.attention.blocked import blocked_attention

BACKENDS = ('dense', 'blocked', 'xla', 'auto')


def visibility(mask: jax.Array | None, causal: bool, batch: int, q_len: int,
               kv_len: int) -> jax.Array:
  """Bool `[batch, 1, q_len, kv_len]`: may query i see key j (padding and causality)."""
  visible = base.key_mask_or_ones(mask, batch, kv_len)[:, None, None, :]
  if causal:
    rows = jnp.arange(q_len)[:, None]
    cols = jnp.arange(kv_len)[None, :]
    visible = visible & (cols <= rows)
  return jnp.broadcast_to(visible, (batch, 1, q_len, kv_len))


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None = None, causal: bool = False,
                    scale: float | None = None) -> jax.Array:
  """Exact attention with the full score matrix materialised: the test oracle.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    mask: None or bool `[batch, kv_len]`, True for real keys.
    causal: query i sees keys j <= i only.
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries
    with no visible key.
  """
  scale = base.default_scale(q.shape[-1]) if scale is None else scale
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  visible = visibility(mask, causal, q.shape[0], q.shape[1], k.shape[1])
  scores = jnp.where(visible, scores, base.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def xla_attention(q, k, v, mask=None, causal=False, scale=None, implementation='xla'):
  """`jax.nn.dot_product_attention`, with queries that see no key set to zero."""
  key_mask = None if mask is None else mask[:, None, None, :]
  out = jax.nn.dot_product_attention(
      q, k, v, mask=key_mask, is_causal=causal, scale=scale,
      implementation=implementation)
  if mask is None:
    return out
  # jax averages v over hidden keys when a query sees none; the contract is zeros.
  if causal:
    # Query i sees a real key iff one of keys 0..i is real.
    seen = jnp.cumsum(mask, axis=-1) > 0
    query_sees_key = seen[:, jnp.minimum(jnp.arange(q.shape[1]), k.shape[1] - 1)]
  else:
    query_sees_key = jnp.broadcast_to(mask.any(-1, keepdims=True), (q.shape[0], q.shape[1]))
  return jnp.where(query_sees_key[:, :, None, None], out, jnp.zeros_like(out))


def cudnn_applies(q, k, v, mask, causal) -> bool:
  """Whether cuDNN flash attention supports this call on the current backend."""
  return (jax.default_backend() == 'gpu'
          and q.dtype in (jnp.float16, jnp.bfloat16)
          and q.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
          and mask is None)


@base.register_attention('full')
class FullAttention(base.Attention):
  """Exact softmax attention; `backend` picks how it is computed."""

  def __init__(self, backend: str = 'auto', q_block: int = 512, kv_block: int = 512,
               *, rngs: nnx.Rngs | None = None):
    base.check_choice('backend', backend, BACKENDS)
    base.check_positive_int('q_block', q_block)
    base.check_positive_int('kv_block', kv_block)
    self.backend = backend
    self.q_block = q_block
    self.kv_block = kv_block

  def __call__(self, q, k, v, mask=None, causal=False):
    base.check_inputs(q, k, v, mask)
    backend = self.backend
    if backend == 'auto':
      backend = 'cudnn' if cudnn_applies(q, k, v, mask, causal) else 'blocked'
    if backend == 'dense':
      return dense_attention(q, k, v, mask, causal)
    if backend == 'blocked':
      return blocked_attention(q, k, v, mask, causal, q_block=self.q_block,
                               kv_block=self.kv_block)
    return xla_attention(q, k, v, mask, causal,
                         implementation='cudnn' if backend == 'cudnn' else 'xla')
