"""Sparse Transformer attention (Child et al. 2019): the strided and fixed factorised patterns.

What is computed, with l = `block_len` and c = `summary_len`: one softmax over
the union of a pattern's two index sets A(1) and A(2) (the paper's
"Factorized self-attention" section and Figure 3; one softmax over the union is
its "merged head" option of "Factorized attention heads"):
- strided: query i sees the keys j with |i - j| <= l (A(1)) and those with
  (i - j) mod l = 0 (A(2)).
- fixed: query i sees the keys of its own block, floor(j / l) = floor(i / l)
  (A(1)), and the summary keys, the last c of every block, j mod l >= l - c
  (A(2)).
Causal mode (the paper's setting) keeps only the keys j <= i; non-causal mode
is the same pattern over both directions. Padding keys are never seen. With
l >= len (strided) or c = l (fixed) every key is seen: exact attention.

How it is computed, block-sparse: only attended keys are multiplied, and no
`len x len` mask or score array exists in forward or backward. Each pattern is
split into disjoint key sets, each one call of the blocked softmax core
(`core.attend`), combined by log-sum-exp (`core.merge`):
- strided: offset l is a multiple of l, so the union is the band
  |i - j| <= l - 1 plus the column {j : (i - j) mod l = 0, j != i}. The band
  is `local.block_attention` over blocks of l, each reading its neighbour
  blocks (only the one before when causal) under the core's window rule. The
  columns are a transpose: viewed as `[len / l, l]`, the tokens of one
  remainder mod l form a column of len / l rows; "an earlier row" is the
  core's causal rule on row indices shifted by one, "a later row" the same
  rule on reversed indices. Time O(len * (3 l + len / l)).
- fixed: the queries' own blocks with the summary keys hidden
  (`local.block_attention`), plus every query over the gathered summary keys
  (len / l * c of them) under the core's causal rule on absolute positions.
  Time O(len * (l + len * c / l)).
The length is padded to a multiple of l. Memory is O(len * head_dim) (the
strided band stores k and v three times). Softmax statistics are float32.

Differences from the public LRA code (`lra_benchmarks/models/sparse_transformer/
sparse_attention.py`, read at commit ad0ff01), on purpose: LRA builds a dense
`[len, len]` mask (O(len^2) time and memory) and is always causal, also in the
classifiers, where this module follows the `causal` argument. The paper writes
A(2) of the fixed pattern as {j : j mod l in {t, ..., l}}, t = l - c; here
that is the c remainders l - c ... l - 1 (c summary cells), while LRA also
counts remainder 0, the first key of every block (c + 1 cells). Defaults
follow LRA's default, the paper's EnWik8 setting: fixed, l = 128, c = 32
(c = l / 4 by default).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.attention import base, core
from efficient_attn.attention.local import block_attention

PATTERNS = ('strided', 'fixed')
# Queries and keys per block of the core calls over whole rows.
_BLOCK = 512


def _columns(x: jax.Array, block_len: int, multiple: int, pad_value=0) -> jax.Array:
  """`[batch, len, heads, d]` -> the core's `[batch * block_len, heads, rows, d]`.

  Row b * block_len + c holds the tokens at positions c, c + block_len, ... of
  batch row b (one remainder mod `block_len`), padded to a multiple of `multiple`.
  """
  batch, length, heads, dim = x.shape
  x = x.reshape(batch, length // block_len, block_len, heads, dim).transpose(0, 2, 3, 1, 4)
  x = x.reshape(batch * block_len, heads, length // block_len, dim)
  return base.pad_axis(x, 2, multiple, pad_value)


def _from_columns(x: jax.Array, batch: int, rows: int) -> jax.Array:
  """Inverse of `_columns` for results `[batch * block_len, heads, padded rows, d]`."""
  _, heads, _, dim = x.shape
  x = x[:, :, :rows].reshape(batch, -1, heads, rows, dim).transpose(0, 3, 1, 2, 4)
  return x.reshape(batch, -1, heads, dim)


def _strided(q, k, v, key_valid, block_len, causal):
  """(out, lse) of the strided pattern: band plus columns, see the module docstring."""
  batch, length = q.shape[:2]
  band = block_attention(q, k, v, key_valid, block_len, before=1, after=0 if causal else 1,
                         causal=causal, window=block_len - 1)
  rows = length // block_len
  plan = core.full_plan(rows, rows, _BLOCK, _BLOCK, causal=True)
  cols = lambda x: _columns(x, block_len, plan.q_block)
  q_cols, k_cols, v_cols = cols(q), cols(k), cols(v)
  valid = _columns(key_valid[:, :, None, None], block_len, plan.q_block, False)[:, 0, :, 0]
  row = np.arange(valid.shape[1])
  # Earlier rows: key row s is seen by query row r iff s <= r - 1. Later rows:
  # the same rule on reversed row indices.
  orders = [row] if causal else [row, row[::-1]]
  parts = [band]
  for order in orders:
    out, lse = core.attend(q_cols, k_cols, v_cols, order[None] - 1,
                           jnp.where(valid, order, -1), plan)
    parts.append((_from_columns(out, batch, rows),
                  _from_columns(lse[..., None], batch, rows)[..., 0]))
  return core.merge(parts)


def _fixed(q, k, v, key_valid, block_len, summary_len, causal):
  """(out, lse) of the fixed pattern: own blocks plus summary keys, see the module docstring."""
  batch, length = q.shape[:2]
  is_summary = np.arange(length) % block_len >= block_len - summary_len
  own = block_attention(q, k, v, key_valid & ~is_summary, block_len, causal=causal)

  def summaries(x):
    """The summary tokens `[batch, len / l * c, ...]` of x `[batch, len, ...]`."""
    x = x.reshape((batch, length // block_len, block_len) + x.shape[2:])
    return x[:, :, block_len - summary_len:].reshape((batch, -1) + x.shape[3:])

  plan = core.full_plan(length, length // block_len * summary_len, _BLOCK, _BLOCK, causal)
  positions = np.arange(length).reshape(-1, block_len)[:, block_len - summary_len:].reshape(-1)
  positions = jnp.where(summaries(key_valid), positions, -1)
  key_pos = base.pad_axis(positions, 1, plan.kv_block, -1)
  query_pos = np.arange(base.round_up(length, plan.q_block))[None]
  out, lse = core.attend(core.to_rows(q, plan.q_block), core.to_rows(summaries(k), plan.kv_block),
                         core.to_rows(summaries(v), plan.kv_block), query_pos, key_pos, plan)
  summary = out.transpose(0, 2, 1, 3)[:, :length], lse.transpose(0, 2, 1)[:, :length]
  return core.merge([own, summary])


def summary_len_of(pattern: str, block_len: int, summary_len: int | None) -> int | None:
  """The checked summary length: `summary_len`, by default block_len // 4 (at least 1) for 'fixed'.

  Raises ValueError unless `pattern` is known, `block_len` and `summary_len`
  are positive ints with summary_len <= block_len, and summary_len is None for
  'strided' (which has no summary keys).
  """
  base.check_choice('pattern', pattern, PATTERNS)
  base.check_positive_int('block_len', block_len)
  if pattern == 'strided':
    if summary_len is not None:
      raise ValueError(f"summary_len applies to pattern='fixed' only, got {summary_len!r} "
                       "with pattern='strided'")
    return None
  if summary_len is None:
    return max(1, block_len // 4)
  base.check_positive_int('summary_len', summary_len)
  if summary_len > block_len:
    raise ValueError(
        f'summary_len must be at most block_len, got summary_len={summary_len} and '
        f'block_len={block_len}')
  return summary_len


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                     causal: bool = False, pattern: str = 'fixed', block_len: int = 128,
                     summary_len: int | None = None, scale: float | None = None) -> jax.Array:
  """Sparse Transformer attention with the strided or fixed pattern, block-sparse.

  Args:
    q: `[batch, len, heads, head_dim]`.
    k: `[batch, len, heads, head_dim]`.
    v: `[batch, len, heads, value_dim]`.
    mask: None or bool `[batch, len]`, True for real keys.
    causal: query i sees keys j <= i only.
    pattern: 'strided' or 'fixed'.
    block_len: l, the stride and band width ('strided') or the block length
      ('fixed').
    summary_len: c, the summary keys at the end of every block ('fixed' only,
      None for 'strided'), 1 <= c <= l; default l // 4 (LRA's 32 of 128).
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  summary_len = summary_len_of(pattern, block_len, summary_len)
  batch, length, _, head_dim = q.shape
  scale = base.default_scale(head_dim) if scale is None else scale
  # A block longer than the sequence sees what one block of the sequence sees.
  block_len = min(block_len, length)
  pad = lambda x, value=0: base.pad_axis(x, 1, block_len, value)
  key_valid = pad(base.key_mask_or_ones(mask, batch, length), False)
  q, k, v = pad(q * jnp.asarray(scale, q.dtype)), pad(k), pad(v)
  if pattern == 'strided':
    out, _ = _strided(q, k, v, key_valid, block_len, causal)
  else:
    out, _ = _fixed(q, k, v, key_valid, block_len, min(summary_len, block_len), causal)
  return out[:, :length]


@base.register_attention('sparse')
class SparseAttention(base.Attention):
  """Sparse Transformer attention, strided or fixed pattern (Child et al. 2019).

  Options as `sparse_attention`.
  """

  def __init__(self, pattern: str = 'fixed', block_len: int = 128,
               summary_len: int | None = None, *, rngs: nnx.Rngs | None = None):
    self.pattern = pattern
    self.block_len = block_len
    self.summary_len = summary_len_of(pattern, block_len, summary_len)

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=True)
    return sparse_attention(q, k, v, mask, causal, self.pattern, self.block_len,
                            self.summary_len)
