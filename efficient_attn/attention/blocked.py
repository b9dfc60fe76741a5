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


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
  """`[batch, len, heads, dim]` -> `[len // block, batch, heads, block, dim]`."""
  b, n, h, d = x.shape
  return x.reshape(b, n // block, block, h, d).transpose(1, 0, 3, 2, 4)


def _from_blocks(x: jax.Array) -> jax.Array:
  """Inverse of `_to_blocks`."""
  nb, b, h, block, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, h, d)


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
  """Blocked forward on padded, pre-scaled inputs; returns (out, lse) in block layout."""
  qb = _to_blocks(q, q_block)          # [nq, b, h, bq, d]
  kb = _to_blocks(k, kv_block)         # [nk, b, h, bk, d]
  vb = _to_blocks(v, kv_block)
  biasb = key_bias.reshape(key_bias.shape[0], -1, kv_block).transpose(1, 0, 2)[:, :, None, None, :]
  num_q, num_kv = qb.shape[0], kb.shape[0]
  b, h = q.shape[0], q.shape[2]
  dv = v.shape[-1]

  def one_query_block(args):
    i, qi = args

    def step(j, carry, causal_block):
      m, l, acc = carry
      s = jnp.einsum('bhqd,bhkd->bhqk', qi, kb[j], preferred_element_type=jnp.float32)
      s = s + biasb[j]
      if causal_block:
        s = s + _causal_bias(i, j, q_block, kv_block)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      pv = jnp.einsum('bhqk,bhkd->bhqd', p.astype(vb.dtype), vb[j],
                      preferred_element_type=jnp.float32)
      acc = acc * correction[..., None] + pv
      return m_new, l, acc

    init = (jnp.full((b, h, q_block), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, q_block), jnp.float32),
            jnp.zeros((b, h, q_block, dv), jnp.float32))
    full_end, end = _key_block_range(i, q_block, kv_block, num_kv, causal)
    carry = jax.lax.fori_loop(0, full_end, functools.partial(step, causal_block=False), init)
    if causal:
      carry = jax.lax.fori_loop(full_end, end, functools.partial(step, causal_block=True), carry)
    m, l, acc = carry
    # Rows whose every key is hidden have m at the mask value: output 0, lse +inf
    # so that the backward pass recomputes probabilities of exactly 0.
    visible = m > base.MASK_VALUE / 2
    out = jnp.where(visible[..., None], acc / jnp.where(visible, l, 1.0)[..., None], 0.0)
    lse = jnp.where(visible, m + jnp.log(jnp.where(visible, l, 1.0)), jnp.inf)
    return out.astype(q.dtype), lse

  return jax.lax.map(one_query_block, (jnp.arange(num_q), qb))


def _backward(q, k, v, key_bias, out_b, lse_b, dout, causal, q_block, kv_block):
  """Gradients of the blocked attention on padded, pre-scaled inputs (block layout in/out)."""
  qb = _to_blocks(q, q_block)
  kb = _to_blocks(k, kv_block)
  vb = _to_blocks(v, kv_block)
  dob = _to_blocks(dout, q_block)
  biasb = key_bias.reshape(key_bias.shape[0], -1, kv_block).transpose(1, 0, 2)[:, :, None, None, :]
  # D_i = rowsum(dO_i * O_i) (Dao 2023, Algorithm 2, line 4).
  delta_b = jnp.einsum('nbhqd,nbhqd->nbhq', dob.astype(jnp.float32), out_b.astype(jnp.float32))
  num_q, num_kv = qb.shape[0], kb.shape[0]

  def one_key_block(j, dq):
    kj, vj = kb[j], vb[j]

    def step(i, carry, causal_block):
      dq, dk, dv = carry
      s = jnp.einsum('bhqd,bhkd->bhqk', qb[i], kj, preferred_element_type=jnp.float32)
      s = s + biasb[j]
      if causal_block:
        s = s + _causal_bias(i, j, q_block, kv_block)
      p = jnp.exp(s - lse_b[i][..., None])
      dv = dv + jnp.einsum('bhqk,bhqd->bhkd', p.astype(dob.dtype), dob[i],
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum('bhqd,bhkd->bhqk', dob[i], vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_b[i][..., None])).astype(q.dtype)
      dq = dq.at[i].add(jnp.einsum('bhqk,bhkd->bhqd', ds, kj,
                                   preferred_element_type=jnp.float32))
      dk = dk + jnp.einsum('bhqk,bhqd->bhkd', ds, qb[i], preferred_element_type=jnp.float32)
      return dq, dk, dv

    init = (dq, jnp.zeros(kj.shape, jnp.float32), jnp.zeros(vj.shape, jnp.float32))
    start, full_start = _query_block_range(j, q_block, kv_block, num_q, causal)
    carry = init
    if causal:
      carry = jax.lax.fori_loop(start, full_start, functools.partial(step, causal_block=True), carry)
    carry = jax.lax.fori_loop(full_start, num_q, functools.partial(step, causal_block=False), carry)
    return carry

  def scan_body(dq, j):
    dq, dk, dv = one_key_block(j, dq)
    return dq, (dk, dv)

  dq0 = jnp.zeros(qb.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(scan_body, dq0, jnp.arange(num_kv))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked_core(q, k, v, key_bias, causal, q_block, kv_block):
  out_b, _ = _forward(q, k, v, key_bias, causal, q_block, kv_block)
  return _from_blocks(out_b)


def _blocked_core_fwd(q, k, v, key_bias, causal, q_block, kv_block):
  out_b, lse_b = _forward(q, k, v, key_bias, causal, q_block, kv_block)
  return _from_blocks(out_b), (q, k, v, key_bias, out_b, lse_b)


def _blocked_core_bwd(causal, q_block, kv_block, residuals, dout):
  q, k, v, key_bias, out_b, lse_b = residuals
  dq, dk, dv = _backward(q, k, v, key_bias, out_b, lse_b, dout, causal, q_block, kv_block)
  return (_from_blocks(dq).astype(q.dtype), _from_blocks(dk).astype(k.dtype),
          _from_blocks(dv).astype(v.dtype), jnp.zeros_like(key_bias))


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
  q_block = min(q_block, _round_up(q_len, 8))
  kv_block = min(kv_block, _round_up(kv_len, 8))
  key_bias = jnp.where(base.key_mask_or_ones(mask, batch, kv_len), 0.0, base.MASK_VALUE)
  key_bias = base.pad_axis(key_bias.astype(jnp.float32), 1, kv_block, base.MASK_VALUE)
  q = base.pad_axis(q * jnp.asarray(scale, q.dtype), 1, q_block)
  k = base.pad_axis(k, 1, kv_block)
  v = base.pad_axis(v, 1, kv_block)
  out = _blocked_core(q, k, v, key_bias, causal, q_block, kv_block)
  return out[:, :q_len]
