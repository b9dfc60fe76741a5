"""Exact attention by blocks with an online softmax (FlashAttention-2), memory linear in length.

Forward: for each query block, a running max `m`, normaliser `l` and output
accumulator are updated key block by key block (Dao 2023, Algorithm 1); only the
log-sum-exp per query is kept for the backward pass. Backward: probabilities are
recomputed block by block from q, k and the log-sum-exp (Dao 2023, Algorithm 2).
Blocks entirely in the future of a causal query block are skipped.
"""

import functools

import jax
import jax.numpy as jnp

from efficient_attn.attention import base


def _causal_bias(i, j, q_block: int, kv_block: int) -> jax.Array:
  """Bias `[q_block, kv_block]` hiding keys after each query in block pair (i, j)."""
  rows = i * q_block + jnp.arange(q_block)[:, None]
  cols = j * kv_block + jnp.arange(kv_block)[None, :]
  return jnp.where(cols <= rows, 0.0, base.MASK_VALUE)


def _key_block_range(i, q_block: int, kv_block: int, num_kv: int, causal: bool):
  """Key blocks seen by query block i: (first masked-diagonal block, end)."""
  if not causal:
    return num_kv, num_kv
  # Key blocks before `full_end` lie entirely at or before the first query row.
  full_end = jnp.minimum((i * q_block + 1) // kv_block, num_kv)
  end = jnp.minimum((i * q_block + q_block - 1) // kv_block + 1, num_kv)
  return full_end, end


def _query_block_range(j, q_block: int, kv_block: int, num_q: int, causal: bool):
  """Query blocks that see key block j: (start, first block needing no causal mask)."""
  if not causal:
    return 0, 0
  start = jnp.minimum((j * kv_block) // q_block, num_q)
  full_start = jnp.minimum(-(-(j * kv_block + kv_block - 1) // q_block), num_q)
  return start, full_start


def _forward(q, k, v, key_bias, causal, q_block, kv_block):
  """Blocked forward for one head: q `[nq, bq, d]`, k/v `[nk, bk, d]`, key_bias `[nk, bk]`.

  Returns the output `[nq, bq, dv]` and the log-sum-exp `[nq, bq]` of each query.
  """
  num_q, num_kv = q.shape[0], k.shape[0]

  def one_query_block(args):
    i, qi = args

    def step(j, carry, causal_block):
      m, l, acc = carry
      s = jnp.dot(qi, k[j].T, preferred_element_type=jnp.float32) + key_bias[j]
      if causal_block:
        s = s + _causal_bias(i, j, q_block, kv_block)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[:, None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      pv = jnp.dot(p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
      return m_new, l, acc * correction[:, None] + pv

    init = (jnp.full((q_block,), -jnp.inf, jnp.float32), jnp.zeros((q_block,), jnp.float32),
            jnp.zeros((q_block, v.shape[-1]), jnp.float32))
    full_end, end = _key_block_range(i, q_block, kv_block, num_kv, causal)
    carry = jax.lax.fori_loop(0, full_end, functools.partial(step, causal_block=False), init)
    if causal:
      carry = jax.lax.fori_loop(full_end, end, functools.partial(step, causal_block=True), carry)
    m, l, acc = carry
    # Rows whose every key is hidden have m at the mask value: output 0, lse +inf
    # so that the backward pass recomputes probabilities of exactly 0.
    visible = m > base.MASK_VALUE / 2
    l = jnp.where(visible, l, 1.0)
    out = jnp.where(visible[:, None], acc / l[:, None], 0.0)
    lse = jnp.where(visible, m + jnp.log(l), jnp.inf)
    return out.astype(q.dtype), lse

  return jax.lax.map(one_query_block, (jnp.arange(num_q), q))


def _backward(q, k, v, key_bias, out, lse, dout, causal, q_block, kv_block):
  """Gradients for one head, in the block layout of `_forward`."""
  # D_i = rowsum(dO_i * O_i) (Dao 2023, Algorithm 2, line 4).
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  num_q, num_kv = q.shape[0], k.shape[0]

  def one_key_block(dq, j):
    kj, vj = k[j], v[j]

    def step(i, carry, causal_block):
      dq, dk, dv = carry
      s = jnp.dot(q[i], kj.T, preferred_element_type=jnp.float32) + key_bias[j]
      if causal_block:
        s = s + _causal_bias(i, j, q_block, kv_block)
      p = jnp.exp(s - lse[i][:, None])
      dv = dv + jnp.dot(p.astype(dout.dtype).T, dout[i], preferred_element_type=jnp.float32)
      dp = jnp.dot(dout[i], vj.T, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][:, None])).astype(q.dtype)
      dq = dq.at[i].add(jnp.dot(ds, kj, preferred_element_type=jnp.float32))
      dk = dk + jnp.dot(ds.T, q[i], preferred_element_type=jnp.float32)
      return dq, dk, dv

    carry = (dq, jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
    start, full_start = _query_block_range(j, q_block, kv_block, num_q, causal)
    if causal:
      carry = jax.lax.fori_loop(start, full_start, functools.partial(step, causal_block=True), carry)
    dq, dk, dv = jax.lax.fori_loop(full_start, num_q, functools.partial(step, causal_block=False), carry)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(num_kv))
  return dq, dk, dv


def _per_head(fn, *args):
  """Maps `fn` over the leading (batch * heads) axis, one head at a time."""
  return jax.lax.map(lambda a: fn(*a), args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked_core(q, k, v, key_bias, causal, q_block, kv_block):
  return _blocked_core_fwd(q, k, v, key_bias, causal, q_block, kv_block)[0]


def _blocked_core_fwd(q, k, v, key_bias, causal, q_block, kv_block):
  forward = functools.partial(_forward, causal=causal, q_block=q_block, kv_block=kv_block)
  out, lse = _per_head(forward, q, k, v, key_bias)
  return out, (q, k, v, key_bias, out, lse)


def _blocked_core_bwd(causal, q_block, kv_block, residuals, dout):
  q, k, v, key_bias, out, lse = residuals
  backward = functools.partial(_backward, causal=causal, q_block=q_block, kv_block=kv_block)
  dq, dk, dv = _per_head(backward, q, k, v, key_bias, out, lse, dout)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(key_bias)


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


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
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  scale = base.default_scale(head_dim) if scale is None else scale
  q_block = min(q_block, base.round_up(q_len, 8))
  kv_block = min(kv_block, base.round_up(kv_len, 8))
  num_heads = q.shape[2]

  def head_blocks(x, block):
    """`[batch, len, heads, dim]` -> `[batch * heads, len // block, block, dim]`, padded."""
    x = base.pad_axis(x, 1, block).transpose(0, 2, 1, 3)
    return x.reshape(batch * num_heads, -1, block, x.shape[-1])

  key_bias = jnp.where(base.key_mask_or_ones(mask, batch, kv_len), 0.0, base.MASK_VALUE)
  key_bias = base.pad_axis(key_bias.astype(jnp.float32), 1, kv_block, base.MASK_VALUE)
  key_bias = jnp.repeat(key_bias.reshape(batch, 1, -1, kv_block), num_heads, axis=1)
  out = _blocked_core(head_blocks(q * jnp.asarray(scale, q.dtype), q_block),
                      head_blocks(k, kv_block), head_blocks(v, kv_block),
                      key_bias.reshape(batch * num_heads, -1, kv_block), causal, q_block, kv_block)
  out = out.reshape(batch, num_heads, -1, out.shape[-1]).transpose(0, 2, 1, 3)
  return out[:, :q_len]
