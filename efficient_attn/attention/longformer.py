"""Longformer attention (Beltagy et al. 2020): a sliding window plus global tokens.

Which keys a query sees (`window` = w, `dilation` = r):
- window, non-causal: query i sees keys j = i + r * t for |t| <= w;
  causal: j = i - r * t for 0 <= t <= w. With r = 1 this is |i - j| <= w,
  or 0 <= i - j <= w.
- global tokens (`global_mask`, bool `[batch, len]`): a global query sees every
  key and every query sees a global key. Causal mode keeps causality: a global
  key is seen only by queries at or after it, and a global query sees only
  keys at or before it.
- padding keys (`mask` False) are never seen, also when they are global.

Computation, with no `len x len` array anywhere (forward or backward):
- band: with dilation r the sequence splits into r interleaved subsequences
  (positions with the same remainder mod r), each an undilated sliding window
  of width w; a reshape puts the remainder next to the heads axis. Queries are
  cut into blocks of `block` rows; each block attends to a strip of whole key
  blocks covering its window (neighbours on both sides, or only before it when
  causal), with the exact window applied by a fixed `[block, strip]` mask.
- global keys: the first `max_global` global tokens of each row (picked by
  top_k) are gathered; every query scores them in an extra `[block, max_global]`
  block, hiding those already in its window so that no key counts twice. One
  softmax (shared max and normaliser, float32) covers both parts.
- global queries: full rows `[max_global, len]` replace their windowed outputs.
The band loops over query blocks with its own backward pass (FlashAttention
style: probabilities are recomputed from the saved log-sum-exp), so time is
O(len * (strip + max_global)) and memory O(len + block * strip), with
strip = block * (1 + 2 * ceil(window / block)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.attention import base


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _to_band_layout(x: jax.Array, dilation: int, block: int) -> jax.Array:
  """`[batch, len, heads, dim]` -> `[batch, dilation, heads, blocks, block, dim]`.

  Position p = (n * block + a) * dilation + c lands at `[:, c, :, n, a]`; `len`
  must be a multiple of `dilation * block`.
  """
  batch, length, heads, dim = x.shape
  x = x.reshape(batch, length // (block * dilation), block, dilation, heads, dim)
  return x.transpose(0, 3, 4, 1, 2, 5)


def _from_band_layout(x: jax.Array) -> jax.Array:
  """Inverse of `_to_band_layout`."""
  batch, dilation, heads, blocks, block, dim = x.shape
  return x.transpose(0, 3, 4, 1, 2, 5).reshape(batch, blocks * block * dilation, heads, dim)


def _strip(x: jax.Array, first: jax.Array, width: int) -> jax.Array:
  """Blocks `first .. first + width - 1` of `[b, r, h, blocks, block, d]` as `[b, r, h, width * block, d]`."""
  strip = jax.lax.dynamic_slice_in_dim(x, first, width, axis=3)
  return strip.reshape(*x.shape[:3], width * x.shape[4], *x.shape[5:])


def _add_strip(x: jax.Array, first: jax.Array, strip: jax.Array) -> jax.Array:
  """Adds `strip` `[b, r, h, width * block, d]` to blocks `first ..` of `x` `[b, r, h, blocks, block, d]`."""
  strip = strip.reshape(*x.shape[:3], -1, *x.shape[4:])
  current = jax.lax.dynamic_slice_in_dim(x, first, strip.shape[3], axis=3)
  return jax.lax.dynamic_update_slice_in_dim(x, current + strip, first, axis=3)


def _window_mask(block: int, before: int, after: int, window: int, causal: bool) -> np.ndarray:
  """Bool `[block, strip]`: may row a of a query block see column t of its key strip."""
  rows = np.arange(block)[:, None]
  cols = np.arange((before + 1 + after) * block)[None, :]
  offset = cols - before * block - rows  # key minus query position, in the subsequence
  if causal:
    return (offset <= 0) & (offset >= -window)
  return np.abs(offset) <= window


class _Band:
  """Static shape of the band: block size and the strip of key blocks around a query block."""

  def __init__(self, block: int, window: int, causal: bool):
    self.block = block
    self.before = -(-window // block)
    self.after = 0 if causal else self.before
    self.width = self.before + 1 + self.after
    self.window_mask = _window_mask(block, self.before, self.after, window, causal)
    self.key = (block, window, causal)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Band) and self.key == other.key


def _exp_scores(score_parts: list[jax.Array]):
  """Unnormalised softmax over keys split into parts; float32 statistics.

  Args:
    score_parts: float32 scores `[..., keys_i]`, hidden keys at `base.MASK_VALUE`.

  Returns:
    (exp(scores - row max) per part, the joint normaliser `[...]`, the row max
    `[...]`, which is at most MASK_VALUE / 2 exactly when a row sees no key).
  """
  # The max only stabilises exp(); it cancels in the result, so no gradient.
  row_max = jax.lax.stop_gradient(
      functools.reduce(jnp.maximum, [s.max(-1) for s in score_parts]))
  probs = [jnp.exp(s - row_max[..., None]) for s in score_parts]
  total = sum(p.sum(-1) for p in probs)
  return probs, total, row_max


def _normalise(out: jax.Array, total: jax.Array, row_max: jax.Array) -> jax.Array:
  """out / total, and zeros for rows that see no key."""
  return jnp.where(row_max[..., None] > base.MASK_VALUE / 2, out / total[..., None], 0.0)


def _block_inputs(band, i, q, k, v, valid):
  """Query block i `[b, r, h, block, d]` with its key and value strips and visibility."""
  q_i = jax.lax.dynamic_index_in_dim(q, i, axis=3, keepdims=False)
  k_strip, v_strip = _strip(k, i, band.width), _strip(v, i, band.width)
  visible = _strip(valid[..., None], i, band.width)[..., None, :, 0] & band.window_mask
  return q_i, k_strip, v_strip, visible


def _block_scores(q_i, k_strip, visible, global_k, global_seen):
  """Masked float32 scores `[b, r, h, block, keys]` of one query block: band part, global part."""
  scores = jnp.einsum('brhqd,brhkd->brhqk', q_i, k_strip, preferred_element_type=jnp.float32)
  parts = [jnp.where(visible, scores, base.MASK_VALUE)]
  if global_k.shape[1]:
    global_scores = jnp.einsum('brhqd,bghd->brhqg', q_i, global_k,
                               preferred_element_type=jnp.float32)
    parts.append(jnp.where(global_seen, global_scores, base.MASK_VALUE))
  return parts


def _band_forward(q, k, v, valid, global_k, global_v, global_seen, band):
  """Forward of `_band_core`; also returns the log-sum-exp `[blocks, b, r, h, block]`."""

  def one_block(out, args):
    i, seen_i = args
    q_i, k_strip, v_strip, visible = _block_inputs(band, i, q, k, v, valid)
    parts = _block_scores(q_i, k_strip, visible, global_k, seen_i)
    probs, total, row_max = _exp_scores(parts)
    out_i = jnp.einsum('brhqk,brhkd->brhqd', probs[0].astype(v.dtype), v_strip,
                       preferred_element_type=jnp.float32)
    if global_k.shape[1]:
      out_i += jnp.einsum('brhqg,bghd->brhqd', probs[1].astype(v.dtype), global_v,
                          preferred_element_type=jnp.float32)
    out_i = _normalise(out_i, total, row_max).astype(q.dtype)
    out = jax.lax.dynamic_update_index_in_dim(out, out_i, i, axis=3)
    # Rows that see no key get lse +inf, so that the backward pass recomputes
    # probabilities of exactly 0.
    lse = jnp.where(row_max > base.MASK_VALUE / 2, row_max + jnp.log(total), jnp.inf)
    return out, lse

  out = jnp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype)
  return jax.lax.scan(one_block, out, (jnp.arange(q.shape[3]), global_seen))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _band_core(q, k, v, valid, global_k, global_v, global_seen, band):
  """Windowed attention of every query block plus the global keys.

  Args:
    q: pre-scaled queries `[batch, r, heads, blocks, block, head_dim]`.
    k: keys `[batch, r, heads, before + blocks + after, block, head_dim]`,
      padded with `band.before` blocks in front and `band.after` behind.
    v: values, padded like k.
    valid: bool `[batch, r, 1, before + blocks + after, block]`, real keys.
    global_k: `[batch, slots, heads, head_dim]` (slots may be 0).
    global_v: `[batch, slots, heads, value_dim]`.
    global_seen: bool `[blocks, batch, r, 1, block, slots]`, may a query see
      a global key outside its window.
    band: static block and strip shape.

  Returns:
    `[batch, r, heads, blocks, block, value_dim]` in the dtype of q.
  """
  out, _ = _band_forward(q, k, v, valid, global_k, global_v, global_seen, band)
  return out


def _band_core_fwd(q, k, v, valid, global_k, global_v, global_seen, band):
  out, lse = _band_forward(q, k, v, valid, global_k, global_v, global_seen, band)
  return out, (q, k, v, valid, global_k, global_v, global_seen, out, lse)


def _band_core_bwd(band, residuals, dout):
  """FlashAttention-2 backward (Dao 2023, Algorithm 2), one query block at a time."""
  q, k, v, valid, global_k, global_v, global_seen, out, lse = residuals

  def one_block(carry, args):
    dq, dk, dv, dk_global, dv_global = carry
    i, lse_i, seen_i = args
    q_i, k_strip, v_strip, visible = _block_inputs(band, i, q, k, v, valid)
    dout_i = jax.lax.dynamic_index_in_dim(dout, i, axis=3, keepdims=False)
    out_i = jax.lax.dynamic_index_in_dim(out, i, axis=3, keepdims=False)
    # D = rowsum(dO * O).
    delta = jnp.einsum('brhqd,brhqd->brhq', dout_i.astype(jnp.float32),
                       out_i.astype(jnp.float32))[..., None]
    parts = _block_scores(q_i, k_strip, visible, global_k, seen_i)
    probs = [jnp.exp(s - lse_i[..., None]) for s in parts]

    dp = jnp.einsum('brhqd,brhkd->brhqk', dout_i, v_strip, preferred_element_type=jnp.float32)
    ds = (probs[0] * (dp - delta)).astype(q.dtype)
    dq_i = jnp.einsum('brhqk,brhkd->brhqd', ds, k_strip, preferred_element_type=jnp.float32)
    dk = _add_strip(dk, i, jnp.einsum('brhqk,brhqd->brhkd', ds, q_i,
                                      preferred_element_type=jnp.float32))
    dv = _add_strip(dv, i, jnp.einsum('brhqk,brhqd->brhkd', probs[0].astype(v.dtype), dout_i,
                                      preferred_element_type=jnp.float32))
    if global_k.shape[1]:
      dp = jnp.einsum('brhqd,bghd->brhqg', dout_i, global_v, preferred_element_type=jnp.float32)
      ds = (probs[1] * (dp - delta)).astype(q.dtype)
      dq_i += jnp.einsum('brhqg,bghd->brhqd', ds, global_k, preferred_element_type=jnp.float32)
      dk_global += jnp.einsum('brhqg,brhqd->bghd', ds, q_i, preferred_element_type=jnp.float32)
      dv_global += jnp.einsum('brhqg,brhqd->bghd', probs[1].astype(v.dtype), dout_i,
                              preferred_element_type=jnp.float32)
    dq = jax.lax.dynamic_update_index_in_dim(dq, dq_i.astype(q.dtype), i, axis=3)
    return (dq, dk, dv, dk_global, dv_global), None

  zeros = lambda x, dtype=jnp.float32: jnp.zeros(x.shape, dtype)
  init = (zeros(q, q.dtype), zeros(k), zeros(v), zeros(global_k), zeros(global_v))
  xs = (jnp.arange(q.shape[3]), lse, global_seen)
  (dq, dk, dv, dk_global, dv_global), _ = jax.lax.scan(one_block, init, xs)
  return (dq, dk.astype(k.dtype), dv.astype(v.dtype), None,
          dk_global.astype(global_k.dtype), dv_global.astype(global_v.dtype), None)


_band_core.defvjp(_band_core_fwd, _band_core_bwd)


def select_global(global_mask: jax.Array, max_global: int):
  """The first `max_global` global positions of each row.

  Args:
    global_mask: bool `[batch, len]`.
    max_global: number of slots.

  Returns:
    (positions int32 `[batch, slots]`, bool `[batch, slots]` True where the slot
    holds a global token), slots = min(max_global, len).
  """
  slots = min(max_global, global_mask.shape[1])
  # top_k breaks ties by lower index, so global positions come first, in order.
  found, positions = jax.lax.top_k(global_mask.astype(jnp.int32), slots)
  return positions, found > 0


def _global_rows(q_global, k, v, valid, key_pos, query_pos, causal):
  """Outputs of global queries over all keys, with keys in band layout.

  Args:
    q_global: pre-scaled global queries `[batch, slots, heads, head_dim]`.
    k: keys `[batch, r, heads, blocks, block, head_dim]`.
    v: values `[batch, r, heads, blocks, block, value_dim]`.
    valid: bool `[batch, r, 1, blocks, block]`, real keys.
    key_pos: int `[r, blocks, block]`, sequence position of each key.
    query_pos: int `[batch, slots]`, sequence position of each global query.
    causal: hide keys after the query.

  Returns:
    `[batch, slots, heads, value_dim]` in the dtype of q.
  """
  batch, slots, heads, _ = q_global.shape
  scores = jnp.einsum('bghd,brhnkd->bhgrnk', q_global, k, preferred_element_type=jnp.float32)
  visible = valid[:, None, None, :, 0]
  if causal:
    visible = visible & (key_pos <= query_pos[:, None, :, None, None, None])
  scores = jnp.where(visible, scores, base.MASK_VALUE).reshape(batch, heads, slots, -1)
  (probs,), total, row_max = _exp_scores([scores])
  rows = jnp.einsum('bhgrnk,brhnkd->bhgd', probs.reshape(*probs.shape[:3], *k.shape[1:2],
                                                         *k.shape[3:5]).astype(v.dtype), v,
                    preferred_element_type=jnp.float32)
  return _normalise(rows, total, row_max).astype(q_global.dtype).transpose(0, 2, 1, 3)


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
    block: queries per block of the band; default about `window`.
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  batch, length, heads, head_dim = q.shape
  scale = base.default_scale(head_dim) if scale is None else scale
  q = q * jnp.asarray(scale, q.dtype)
  key_valid = base.key_mask_or_ones(mask, batch, length)

  sub_len = -(-length // dilation)  # length of each interleaved subsequence
  window = min(window, sub_len - 1)
  if block is None:
    block = max(window, 1)
  block = min(_round_up(block, 8), _round_up(sub_len, 8))
  band = _Band(block, window, causal)

  def key_blocks(x, pad_value=0):
    x = _to_band_layout(base.pad_axis(x, 1, block * dilation, pad_value), dilation, block)
    widths = [(0, 0)] * x.ndim
    widths[3] = (band.before, band.after)
    return jnp.pad(x, widths, constant_values=pad_value)

  q_band = _to_band_layout(base.pad_axis(q, 1, block * dilation), dilation, block)
  k_band, v_band = key_blocks(k), key_blocks(v)
  valid = key_blocks(key_valid[:, :, None, None], False)[..., 0]
  blocks = q_band.shape[3]
  # Sequence position of each query and key in band layout, [r, blocks, block].
  query_pos = (np.arange(blocks * block).reshape(1, blocks, block) * dilation
               + np.arange(dilation)[:, None, None])
  key_pos = (np.arange(-band.before * block, (blocks + band.after) * block).reshape(
      1, -1, block) * dilation + np.arange(dilation)[:, None, None])

  if global_mask is None:
    positions = jnp.zeros((batch, 0), jnp.int32)
    global_seen = jnp.zeros((blocks, batch, dilation, 1, block, 0), bool)
  else:
    positions, found = select_global(global_mask, max_global)
    key_ok = found & jnp.take_along_axis(key_valid, positions, axis=1)
    # Key minus query position, [blocks, batch, r, block, slots].
    offset = (positions[None, :, None, None, :]
              - query_pos.transpose(1, 0, 2)[:, None, :, :, None])
    span = dilation * window
    if causal:
      in_window = (offset <= 0) & (offset >= -span)
    else:
      in_window = jnp.abs(offset) <= span
    in_window &= offset % dilation == 0
    # A global key inside the window is counted there, not twice.
    global_seen = key_ok[None, :, None, None, :] & ~in_window
    if causal:
      global_seen &= offset <= 0
    global_seen = global_seen[:, :, :, None]
  take = lambda x: jnp.take_along_axis(x, positions[:, :, None, None], axis=1)

  out = _band_core(q_band, k_band, v_band, valid, take(k), take(v), global_seen, band)
  out = _from_band_layout(out)[:, :length]

  if global_mask is not None:
    rows = _global_rows(take(q), k_band, v_band, valid, key_pos, positions, causal)
    batch_index = np.arange(batch)[:, None]
    current = out[batch_index, positions]
    out = out.at[batch_index, positions].set(
        jnp.where(found[:, :, None, None], rows, current))
  return out


def check_global_mask(global_mask, batch: int, length: int, max_global: int) -> None:
  """Raises ValueError unless `global_mask` is None or bool `[batch, len]` with at most
  `max_global` global tokens per row (counted only when its values are known)."""
  if global_mask is None:
    return
  if not hasattr(global_mask, 'shape') or global_mask.dtype != jnp.bool_:
    raise ValueError(
        'global_mask must be a bool array [batch, len], got '
        f'{getattr(global_mask, "dtype", type(global_mask).__name__)}')
  if global_mask.shape != (batch, length):
    raise ValueError(
        f'global_mask must have shape [batch, len] = {(batch, length)}, got {global_mask.shape}')
  if not isinstance(global_mask, jax.core.Tracer):
    most = int(np.asarray(global_mask).sum(-1).max(initial=0))
    if most > max_global:
      raise ValueError(
          f'global_mask has {most} global tokens in a row but max_global={max_global}; '
          'raise max_global')


@base.register_attention('longformer')
class LongformerAttention(base.Attention):
  """Sliding-window attention with dilation and global tokens (Beltagy et al. 2020)."""

  def __init__(self, window: int = 256, dilation: int = 1, max_global: int = 16,
               block: int | None = None, *, rngs: nnx.Rngs | None = None):
    base.check_positive_int('window', window)
    base.check_positive_int('dilation', dilation)
    base.check_positive_int('max_global', max_global)
    if block is not None:
      base.check_positive_int('block', block)
    self.window = window
    self.dilation = dilation
    self.max_global = max_global
    self.block = block

  def __call__(self, q, k, v, mask=None, causal=False, global_mask=None):
    base.check_inputs(q, k, v, mask, self_attention=True)
    check_global_mask(global_mask, q.shape[0], q.shape[1], self.max_global)
    return sliding_window_attention(
        q, k, v, mask, causal, window=self.window, dilation=self.dilation,
        global_mask=global_mask, max_global=self.max_global, block=self.block)
