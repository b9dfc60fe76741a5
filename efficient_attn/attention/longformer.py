"""Longformer attention (Beltagy et al. 2020): a sliding window plus global tokens.

Which keys a query sees (`window` = w, `dilation` = r):
- window, non-causal: query i sees keys j = i + r * t for |t| <= w;
  causal: j = i - r * t for 0 <= t <= w. With r = 1 this is |i - j| <= w,
  or 0 <= i - j <= w.
- global tokens (`global_mask`, bool `[batch, len]`, given at call time): a
  global query sees every key and every query sees a global key. Causal mode
  keeps causality: a global key is seen only by queries at or after it, and a
  global query sees only keys at or before it. At most `max_global` (static)
  global tokens per row: the module raises ValueError for more, at once when
  the mask's values are known and, under jit, from a host callback when the
  step runs (the pure function keeps the first `max_global` of a row global).
- padding keys (`mask` False) are never seen, also when they are global.

How it is computed, with no `len x len` array anywhere (forward or backward),
as three calls of the blocked softmax core (`core.attend`):
- band: with dilation r the sequence splits into r interleaved subsequences
  (positions with the same remainder mod r), each an undilated sliding window
  of width w; a reshape puts the remainder next to the batch axis. Queries are
  cut into blocks of `block` rows and each block reads the strip of key blocks
  that covers its window (neighbours on both sides, or only before it when
  causal); the core's window rule on subsequence positions applies the exact
  window. Global tokens are hidden from the band.
- global keys: the global tokens of each row fill `max_global` slots (a
  one-hot selector from a running count, so gathering them is a small matrix
  product); every query attends to them in a second call, merged with the band
  by log-sum-exp (`core.merge`). As the band hides them, no key counts twice.
- global queries: full rows `[max_global, len]` replace their windowed outputs.
Time is O(len * (strip + max_global)) and memory O(len * (head_dim +
max_global)), with strip = block * (1 + 2 * ceil(window / block)) keys (half
the neighbours when causal). Softmax statistics are float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.attention import base, core


def _to_band_layout(x: jax.Array, dilation: int) -> jax.Array:
  """`[batch, len, heads, dim]` -> `[batch, dilation, heads, len // dilation, dim]`.

  Position p = s * dilation + c lands at `[:, c, :, s]`: row c holds the
  subsequence of positions with remainder c.
  """
  batch, length, heads, dim = x.shape
  return x.reshape(batch, length // dilation, dilation, heads, dim).transpose(0, 2, 3, 1, 4)


def _from_band_layout(x: jax.Array) -> jax.Array:
  """Inverse of `_to_band_layout`."""
  batch, dilation, heads, sub_len, dim = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(batch, sub_len * dilation, heads, dim)


def global_selector(global_mask: jax.Array, max_global: int) -> jax.Array:
  """One-hot bool `[batch, slots, len]` of the first `max_global` global tokens of each row.

  Slot s of a row holds its s-th global token, or nothing (all False) when the
  row has fewer; slots = min(max_global, len).
  """
  slots = min(max_global, global_mask.shape[1])
  rank = jnp.cumsum(global_mask, axis=1) - 1
  return global_mask[:, None, :] & (rank[:, None, :] == np.arange(slots)[:, None])


def _global_parts(x: jax.Array, selector: jax.Array) -> jax.Array:
  """The global tokens `[batch, heads, slots, dim]` of x `[batch, len, heads, dim]`, slots padded to 8."""
  # Gathering the few global tokens is a small matrix product.
  gathered = jnp.einsum('bgn,bnhd->bhgd', selector.astype(x.dtype), x)
  return base.pad_axis(gathered, 2, 8)


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             mask: jax.Array | None = None, causal: bool = False,
                             window: int = 256, dilation: int = 1,
                             global_mask: jax.Array | None = None, max_global: int = 16,
                             block: int | None = None, scale: float | None = None) -> jax.Array:
  """Sliding-window attention with dilation and global tokens, O(len * window).

  Args:
    q: `[batch, len, heads, head_dim]`.
    k: `[batch, len, heads, head_dim]`.
    v: `[batch, len, heads, value_dim]`.
    mask: None or bool `[batch, len]`, True for real keys.
    causal: query i sees keys j <= i only.
    window: keys on each side (one side when causal), counted in dilated steps.
    dilation: query i sees keys i + dilation * t, |t| <= window.
    global_mask: None or bool `[batch, len]`, True for global tokens.
    max_global: global tokens handled per row; only the first `max_global`
      global tokens of a row are global, later ones act as ordinary tokens.
    block: queries per block of the band (rounded up to a multiple of 8);
      default window / 4, within [32, 256].
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  batch, length, heads, head_dim = q.shape
  scale = base.default_scale(head_dim) if scale is None else scale
  q = q * jnp.asarray(scale, q.dtype)
  key_valid = base.key_mask_or_ones(mask, batch, length)
  if global_mask is None:
    selector = jnp.zeros((batch, 0, length), bool)
  else:
    selector = global_selector(global_mask, max_global)
  is_global = selector.any(1)

  sub_len = -(-length // dilation)  # length of each interleaved subsequence
  window = min(window, sub_len - 1)
  if block is None:
    # Measured on CPU: strips of about 2.25 windows beat fewer, larger blocks.
    block = min(max(window // 4, 32), 256)
  block = min(base.round_up(block, 8), base.round_up(sub_len, 8))
  before = -(-window // block)
  after = 0 if causal else before
  band_plan = core.Plan(block, block, before + 1 + after, kv_stride=block, causal=causal,
                        window=window)

  def band_layout(x, pad_value=0, pad=(0, 0)):
    """`[batch, len, heads, d]` -> `[batch * r, heads, blocks * block + pad, d]`."""
    x = _to_band_layout(base.pad_axis(x, 1, block * dilation, pad_value), dilation)
    x = jnp.pad(x, [(0, 0)] * 3 + [pad, (0, 0)], constant_values=pad_value)
    return x.reshape((batch * dilation,) + x.shape[2:])

  # Keys are padded with `before` blocks in front and `after` behind, so that
  # the strip of query block i starts at key block i. Positions count in the
  # subsequence, shifted by the front padding.
  key_pad = (before * block, after * block)
  q_band = band_layout(q)
  in_band = band_layout((key_valid & ~is_global)[:, :, None, None], False, key_pad)[:, 0, :, 0]
  band_key_pos = core.key_positions(in_band, in_band.shape[1], 1)
  band_query_pos = np.arange(q_band.shape[2])[None] + before * block
  out, lse = core.attend(q_band, band_layout(k, pad=key_pad), band_layout(v, pad=key_pad),
                         band_query_pos, band_key_pos, band_plan)
  from_band = lambda x: _from_band_layout(x.reshape((batch, dilation) + x.shape[1:]))[:, :length]
  out, lse = from_band(out), from_band(lse[..., None])[..., 0]
  if global_mask is None:
    return out

  positions = jnp.einsum('bgn,n->bg', selector.astype(jnp.int32), np.arange(length))
  has_key = (selector & key_valid[:, None, :]).any(-1)
  global_key_pos = base.pad_axis(jnp.where(has_key, positions, -1), 1, 8, -1)
  global_k, global_v = _global_parts(k, selector), _global_parts(v, selector)
  slots = global_k.shape[2]
  # Every query over the global keys, merged with the band.
  query_plan = core.full_plan(length, slots, 512, slots, causal)
  query_pos = np.arange(base.round_up(length, query_plan.q_block))[None]
  out_g, lse_g = core.attend(core.to_rows(q, query_plan.q_block), global_k, global_v, query_pos,
                             global_key_pos, query_plan)
  out_g, lse_g = out_g.transpose(0, 2, 1, 3)[:, :length], lse_g.transpose(0, 2, 1)[:, :length]
  out, _ = core.merge([(out, lse), (out_g, lse_g)])

  # Global queries over every key, replacing their windowed outputs.
  key_plan = core.full_plan(slots, length, slots, 512, causal)
  key_pos = core.key_positions(mask, length, key_plan.kv_block)
  global_query_pos = base.pad_axis(positions, 1, 8)
  rows_out, _ = core.attend(_global_parts(q, selector), core.to_rows(k, key_plan.kv_block),
                            core.to_rows(v, key_plan.kv_block), global_query_pos, key_pos,
                            key_plan)
  rows_out = jnp.einsum('bgn,bhgd->bnhd', selector.astype(rows_out.dtype),
                        rows_out[:, :, :selector.shape[1]])
  return jnp.where(is_global[:, :, None, None], rows_out, out)


def _raise_if_too_many_global(most, max_global: int) -> None:
  """Raises ValueError when a row has more than `max_global` global tokens."""
  if int(most) > max_global:
    raise ValueError(
        f'global_mask has {int(most)} global tokens in a row but max_global={max_global}; '
        'raise max_global')


def check_global_mask(global_mask, batch: int, length: int, max_global: int,
                      count_under_jit: bool = True) -> None:
  """Raises ValueError unless `global_mask` is None or a bool `[batch, len]` within `max_global`.

  With concrete values the count is checked at once; under jit a host callback
  checks it when the step runs (unless `count_under_jit` is False), so the error
  surfaces (as a JaxRuntimeError carrying this message) instead of global tokens
  being silently dropped.
  """
  if global_mask is None:
    return
  if not hasattr(global_mask, 'shape') or global_mask.dtype != jnp.bool_:
    raise ValueError(
        'global_mask must be a bool array [batch, len], got '
        f'{getattr(global_mask, "dtype", type(global_mask).__name__)}')
  if global_mask.shape != (batch, length):
    raise ValueError(
        f'global_mask must have shape [batch, len] = {(batch, length)}, got {global_mask.shape}')
  if isinstance(global_mask, jax.core.Tracer):
    if not count_under_jit:
      return
    most = global_mask.sum(-1, dtype=jnp.int32).max(initial=0)
    jax.debug.callback(_raise_if_too_many_global, most, max_global)
  else:
    _raise_if_too_many_global(np.asarray(global_mask).sum(-1).max(initial=0), max_global)


@base.register_attention('longformer')
class LongformerAttention(base.Attention):
  """Sliding-window attention with dilation and global tokens (Beltagy et al. 2020).

  Options as `sliding_window_attention`; `check_global_count=False` drops the host
  callback that, under jit, checks every step that no row has more than
  `max_global` global tokens.
  """

  global_tokens = True

  def __init__(self, window: int = 256, dilation: int = 1, max_global: int = 16,
               block: int | None = None, check_global_count: bool = True, *,
               rngs: nnx.Rngs | None = None):
    base.check_positive_int('window', window)
    base.check_positive_int('dilation', dilation)
    base.check_positive_int('max_global', max_global)
    if block is not None:
      base.check_positive_int('block', block)
    self.window = window
    self.dilation = dilation
    self.max_global = max_global
    self.block = block
    self.check_global_count = check_global_count

  def __call__(self, q, k, v, mask=None, causal=False, global_mask=None, *,
               deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=True)
    check_global_mask(global_mask, q.shape[0], q.shape[1], self.max_global,
                      self.check_global_count)
    return sliding_window_attention(
        q, k, v, mask, causal, window=self.window, dilation=self.dilation,
        global_mask=global_mask, max_global=self.max_global, block=self.block)
