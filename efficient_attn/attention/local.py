"""Local attention (LRA's "Local Attention" baseline): softmax within non-overlapping blocks.

What is computed: the sequence is cut into contiguous blocks of `block_len`
tokens (the last one padded); query i sees the keys of its own block, and with
`look_back` also those of the block before it (like the memory blocks of
Parmar et al. 2018's local 1D attention). Causal mode keeps only the
keys j <= i among them. Padding keys are never seen.

How: the blocks become rows of the batch axis, each with its own key block and
neighbours concatenated behind it (so every key is stored 1 + look_back times),
and one call of the blocked softmax core (`core.attend`) attends each query
block to its row, with relative positions for the causal and window rules.
Time is O(len * block_len), memory O(len * head_dim); softmax statistics are
float32.

Differences from the public LRA code (`lra_benchmarks/models/local/
local_attention.py`, read at commit a2e5057), on purpose:
- LRA has no look-back option: each query sees its own block only, which is
  the default here (`look_back=False`); LRA's default block is 50 tokens.
- LRA reshapes `[batch, len]` to `[batch, block_size, len // block_size]` and
  attends over the `block_size` axis, so a query there sees the keys at
  positions equal to its own modulo len / block_size (a strided pattern), not
  its contiguous block, while its padding mask is cut into contiguous blocks
  and so applied to other tokens than the ones it masks. This module computes
  contiguous blocks, which local attention means and LRA's mask assumes.
- LRA pads a whole extra block when the length is already a multiple of
  `block_size`, and combines query and key padding; here padding queries
  simply give outputs that callers ignore.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.attention import base, core


def _neighbour_blocks(x: jax.Array, block_len: int, before: int, after: int,
                      pad_value=0) -> jax.Array:
  """`[batch, len, ...]` -> `[batch, blocks, (before + 1 + after) * block_len, ...]`.

  Row r holds blocks r - before ... r + after in order, `pad_value` beyond the
  ends; len is a multiple of `block_len`.
  """
  batch, length = x.shape[:2]
  widths = [(0, 0), (before * block_len, after * block_len)] + [(0, 0)] * (x.ndim - 2)
  padded = jnp.pad(x, widths, constant_values=pad_value)
  shape = (batch, length // block_len, block_len) + x.shape[2:]
  parts = [padded[:, o * block_len:o * block_len + length].reshape(shape)
           for o in range(before + 1 + after)]
  return jnp.concatenate(parts, axis=2)


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                    block_len: int, before: int = 0, after: int = 0, causal: bool = False,
                    window: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of each query block over its own key block and its neighbours.

  Args:
    q: pre-scaled queries `[batch, len, heads, head_dim]`, len a multiple of
      `block_len`.
    k: keys `[batch, len, heads, head_dim]`.
    v: values `[batch, len, heads, value_dim]`.
    key_valid: bool `[batch, len]`, False for keys no query sees.
    block_len: tokens per block.
    before: key blocks read before the query's own block.
    after: key blocks read after it.
    causal: query i sees keys j <= i only.
    window: None, or query i sees keys j with |i - j| <= window only.

  Returns:
    out `[batch, len, heads, value_dim]` in the dtype of q (zeros for queries
    that see no key) and lse float32 `[batch, len, heads]` (`core.NO_KEY_LSE`
    for them), ready for `core.merge`.
  """
  batch, length, heads, _ = q.shape
  blocks = length // block_len

  def rows(x):
    """`[batch, blocks, n, heads, d]` -> the core's `[batch * blocks, heads, n, d]`."""
    return x.reshape((batch * blocks,) + x.shape[2:]).transpose(0, 2, 1, 3)

  steps = before + 1 + after
  keys = lambda x: rows(_neighbour_blocks(x, block_len, before, after))
  q_rows = rows(q.reshape(batch, blocks, block_len, heads, q.shape[-1]))
  valid = _neighbour_blocks(key_valid, block_len, before, after, False)
  key_pos = jnp.where(valid, np.arange(steps * block_len), -1).reshape(batch * blocks, -1)
  query_pos = np.arange(block_len)[None] + before * block_len
  plan = core.Plan(block_len, block_len, steps, causal=causal, window=window)
  out, lse = core.attend(q_rows, keys(k), keys(v), query_pos, key_pos, plan)
  out = out.reshape(batch, blocks, heads, block_len, -1).transpose(0, 1, 3, 2, 4)
  lse = lse.reshape(batch, blocks, heads, block_len).transpose(0, 1, 3, 2)
  return out.reshape(batch, length, heads, -1), lse.reshape(batch, length, heads)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                    causal: bool = False, block_len: int = 50, look_back: bool = False,
                    scale: float | None = None) -> jax.Array:
  """Softmax attention within non-overlapping blocks, O(len * block_len).

  Args:
    q: `[batch, len, heads, head_dim]`.
    k: `[batch, len, heads, head_dim]`.
    v: `[batch, len, heads, value_dim]`.
    mask: None or bool `[batch, len]`, True for real keys.
    causal: query i sees keys j <= i only.
    block_len: tokens per block; the length is padded to whole blocks.
    look_back: queries also see the keys of the previous block.
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  batch, length, _, head_dim = q.shape
  scale = base.default_scale(head_dim) if scale is None else scale
  # One block of the whole sequence is the same as any longer block.
  block_len = min(block_len, length)
  pad = lambda x, value=0: base.pad_axis(x, 1, block_len, value)
  key_valid = pad(base.key_mask_or_ones(mask, batch, length), False)
  out, _ = block_attention(pad(q * jnp.asarray(scale, q.dtype)), pad(k), pad(v), key_valid,
                           block_len, before=int(look_back), causal=causal)
  return out[:, :length]


@base.register_attention('local')
class LocalAttention(base.Attention):
  """Softmax attention within non-overlapping blocks (LRA's Local Attention).

  Options as `local_attention`.
  """

  def __init__(self, block_len: int = 50, look_back: bool = False, *,
               rngs: nnx.Rngs | None = None):
    base.check_positive_int('block_len', block_len)
    if not isinstance(look_back, bool):
      raise ValueError(f'look_back must be a bool, got {look_back!r}')
    self.block_len = block_len
    self.look_back = look_back

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=True)
    return local_attention(q, k, v, mask, causal, block_len=self.block_len,
                           look_back=self.look_back)
