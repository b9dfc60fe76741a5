"""Attention through feature maps: D^-1 phi(Q) (phi(K)^T V) in linear time, by blocks.

With a feature map phi, attention weights phi(q_i).phi(k_j) make the output
D^-1 phi(Q) (phi(K)^T V) with D = diag(phi(Q) phi(K)^T 1) (Katharopoulos et al.
2020, Section 3.2; Choromanski et al. 2021, Eq. 4), so no `[q_len, kv_len]`
matrix is formed. Non-causal: phi(K)^T V is summed over key blocks, then applied
to query blocks. Causal (Katharopoulos et al. 2020, Section 3.3): a scan over
blocks of chunks carries the prefix sum of phi(K)^T V; inside a block, chunks
add the sums of earlier chunks and the masked quadratic form of their own.
Several chunks per step (`chunks_per_step`) give larger matrix products on a
short scan. A column of ones after V makes D the last output column. Blocks
are recomputed in the backward pass (`jax.checkpoint`), so no `[length,
num_features]` array is stored. Performer and linear attention both call
`feature_attention`.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from efficient_attn.attention import base


def block_size(length: int, causal: bool, chunk_len: int, block_len: int,
               chunks_per_step: int = 1) -> int:
  """Positions per block of `feature_attention`.

  Causal: `chunks_per_step` chunks of `chunk_len` (fewer and shorter ones for
  short inputs); non-causal: `block_len` (at most `length`).
  """
  if not causal:
    return min(block_len, length)
  chunk = min(chunk_len, length)
  return chunk * min(chunks_per_step, -(-length // chunk))


def to_blocks(x: jax.Array, block: int) -> jax.Array:
  """`[batch, len, heads, d]` -> `[n_blocks, batch, heads, block, d]`, zero-padded."""
  return base.to_blocks(base.pad_axis(x, 1, block), block)


def mask_blocks(mask: jax.Array, block: int) -> jax.Array:
  """Bool `[batch, len]` -> `[n_blocks, batch, 1, block, 1]`, padded with False."""
  batch = mask.shape[0]
  mask = base.pad_axis(mask, 1, block, False)
  return mask.reshape(batch, -1, block).transpose(1, 0, 2)[:, :, None, :, None]


def _normalize(out: jax.Array, has_key: jax.Array, dtype) -> jax.Array:
  """D^-1 numerator from `[..., value_dim + 1]` (D last); zero where no key is visible."""
  numerator, denominator = out[..., :-1], out[..., -1:]
  denominator = jnp.where(has_key, denominator, 1.0)
  return jnp.where(has_key, numerator / denominator, 0.0).astype(dtype)


def _bidirectional(q_blocks, k_blocks, v_blocks, valid_blocks, has_key, query_features,
                   key_features, num_features):
  """Non-causal D^-1 phi(Q) (phi(K)^T V), by key blocks then by query blocks."""
  batch, heads, _, value_dim = v_blocks.shape[1:]
  state = jnp.zeros((batch, heads, num_features, value_dim), jnp.float32)

  def add_block(state, blocks):
    k, v, valid = blocks
    return state + jnp.einsum('bhnm,bhnd->bhmd', key_features(k, valid), v,
                              preferred_element_type=jnp.float32), None

  state, _ = jax.lax.scan(jax.checkpoint(add_block, prevent_cse=False), state,
                          (k_blocks, v_blocks, valid_blocks))

  def attend(q):
    out = jnp.einsum('bhnm,bhmd->bhnd', query_features(q), state,
                     preferred_element_type=jnp.float32)
    return _normalize(out, has_key, q.dtype)

  return jax.lax.map(jax.checkpoint(attend, prevent_cse=False), q_blocks)


def _causal(q_blocks, k_blocks, v_blocks, valid_blocks, has_key_blocks, query_features,
            key_features, num_features, chunk_len):
  """Causal D^-1 phi(Q) (phi(K)^T V) by prefix sums over chunks.

  A scan over blocks of whole chunks carries the sum of phi(K)^T V over earlier
  blocks. Inside a block, chunk c adds the sums of the block's earlier chunks
  (an exclusive cumulative sum, so that no future chunk enters even in
  rounding) and the masked quadratic form (phi(Q_c) phi(K_c)^T * lower) V_c.
  """
  batch, heads, block, value_dim = v_blocks.shape[1:]
  lower = jnp.tril(jnp.ones((chunk_len, chunk_len), dtype=bool))
  state = jnp.zeros((batch, heads, num_features, value_dim), jnp.float32)
  chunks = lambda x: x.reshape(batch, heads, block // chunk_len, chunk_len, x.shape[-1])

  def step(state, blocks):
    q, k, v, valid, has_key = blocks
    phi_q = chunks(query_features(q))
    phi_k = chunks(key_features(k, valid))
    v = chunks(v)
    kv = jnp.einsum('bhcjm,bhcjd->bhcmd', phi_k, v, preferred_element_type=jnp.float32)
    summed = jnp.cumsum(kv, axis=2)
    before = jnp.concatenate([jnp.zeros_like(kv[:, :, :1]), summed[:, :, :-1]], axis=2)
    earlier = state[:, :, None] + before
    scores = jnp.einsum('bhcim,bhcjm->bhcij', phi_q, phi_k, preferred_element_type=jnp.float32)
    scores = jnp.where(lower, scores, 0.0)
    out = (jnp.einsum('bhcij,bhcjd->bhcid', scores, v, preferred_element_type=jnp.float32)
           + jnp.einsum('bhcim,bhcmd->bhcid', phi_q, earlier, preferred_element_type=jnp.float32))
    out = out.reshape(batch, heads, block, value_dim)
    return state + summed[:, :, -1], _normalize(out, has_key, q.dtype)

  _, out = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), state,
                        (q_blocks, k_blocks, v_blocks, valid_blocks, has_key_blocks))
  return out


def feature_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      query_features: Callable[[jax.Array], jax.Array],
                      key_features: Callable[[jax.Array, jax.Array], jax.Array],
                      num_features: int, mask: jax.Array | None = None,
                      causal: bool = False, chunk_len: int = 64, block_len: int = 256,
                      chunks_per_step: int = 1) -> jax.Array:
  """D^-1 phi(Q) (phi(K)^T V) with the given feature maps, by blocks.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    query_features: maps a query block `[batch, heads, block, head_dim]` to its
      non-negative features `[batch, heads, block, num_features]`.
    key_features: maps a key block and its validity (bool `[batch, 1, block,
      1]`) to features of the same layout, zero where not valid.
    num_features: the feature dimension m.
    mask: None or bool `[batch, kv_len]`, True for real keys.
    causal: query i sees keys j <= i only (needs q_len == kv_len).
    chunk_len: chunk length of the causal prefix sums.
    block_len: positions per block in non-causal attention (a memory/speed
      trade-off only).
    chunks_per_step: chunks per step of the causal scan (a speed trade-off
      only: one step computes its chunks together).

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  batch, q_len = q.shape[:2]
  kv_len = k.shape[1]
  key_mask = base.key_mask_or_ones(mask, batch, kv_len)
  q_block = block_size(q_len, causal, chunk_len, block_len, chunks_per_step)
  kv_block = block_size(kv_len, causal, chunk_len, block_len, chunks_per_step)
  v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  q_blocks = to_blocks(q, q_block)
  k_blocks = to_blocks(k, kv_block)
  v_blocks = to_blocks(v, kv_block)
  valid_blocks = mask_blocks(key_mask, kv_block)
  if causal:
    has_key_blocks = mask_blocks(jnp.cumsum(key_mask, axis=1) > 0, q_block)
    out = _causal(q_blocks, k_blocks, v_blocks, valid_blocks, has_key_blocks,
                  query_features, key_features, num_features, min(chunk_len, q_len))
  else:
    has_key = key_mask.any(axis=1)[:, None, None, None]
    out = _bidirectional(q_blocks, k_blocks, v_blocks, valid_blocks, has_key,
                         query_features, key_features, num_features)
  return base.from_blocks(out)[:, :q_len]
