"""Exact attention by blocks with an online softmax (FlashAttention-2), memory linear in length.

A thin layout wrapper around `core.attend`: heads become the core's H axis
(batched inside every block step), the padding mask becomes key positions
(-1 for padding) shared by all heads, and causality is the core's causal rule
on query and key indices, so key blocks entirely in the future of a query block
are skipped and blocks entirely in its past need no mask.
"""

import jax
import jax.numpy as jnp

from efficient_attn.attention import base, core


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: jax.Array | None = None, causal: bool = False,
                      scale: float | None = None, q_block: int = 512,
                      kv_block: int = 512) -> jax.Array:
  """Exact attention computed by blocks, memory O(length) in forward and backward.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    mask: None or bool `[batch, kv_len]`, True for real keys.
    causal: query i sees keys j <= i only.
    scale: logit scale, default 1/sqrt(head_dim).
    q_block: queries per block (shrunk for short inputs).
    kv_block: keys per block (shrunk for short inputs).

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  q_len, head_dim = q.shape[1], q.shape[3]
  kv_len = k.shape[1]
  scale = base.default_scale(head_dim) if scale is None else scale
  plan = core.full_plan(q_len, kv_len, q_block, kv_block, causal)
  query_pos = jnp.arange(base.round_up(q_len, plan.q_block))[None]
  key_pos = core.key_positions(mask, kv_len, plan.kv_block)
  out, _ = core.attend(core.to_rows(q * jnp.asarray(scale, q.dtype), plan.q_block),
                       core.to_rows(k, plan.kv_block), core.to_rows(v, plan.kv_block),
                       query_pos, key_pos, plan)
  return out.transpose(0, 2, 1, 3)[:, :q_len]
