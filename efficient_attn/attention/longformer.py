"""Longformer attention (Beltagy et al. 2020): a sliding window plus global tokens.

Which keys a query sees (`window` = w, `dilation` = r):
- window, non-causal: query i sees keys j = i + r * t for |t| <= w;
  causal: j = i - r * t for 0 <= t <= w. With r = 1 this is |i - j| <= w,
  or 0 <= i - j <= w.
- global tokens (`global_mask`, bool `[batch, len]`, given at call time): a
  global query sees every key and every query sees a global key. Causal mode
  keeps causality: a global key is seen only by queries at or after it, and a
  global query sees only keys at or before it. At most `max_global` (static)
  global tokens per row: the module raises ValueError for more when the mask's
  values are known; under jit the first `max_global` of a row are global and
  later ones act as ordinary tokens.
- padding keys (`mask` False) are never seen, also when they are global.

How it is computed, with no `len x len` array anywhere (forward or backward):
- band: with dilation r the sequence splits into r interleaved subsequences
  (positions with the same remainder mod r), each an undilated sliding window
  of width w; a reshape puts the remainder next to the heads axis. Queries are
  cut into blocks of `block` rows and each block attends to the strip of key
  blocks that covers its window (neighbours on both sides, or only before it
  when causal), with the exact window applied by a fixed `[block, strip]` mask.
  A loop over query blocks with its own backward pass (FlashAttention-2 style,
  probabilities recomputed from the saved log-sum-exp) keeps one block's scores
  in memory at a time.
- global keys: the global tokens of each row fill `max_global` slots (a
  one-hot selector from a running count, so gathering them is a small matrix
  product). They are appended to every block's key strip, hidden from queries
  that already have them in their window so that no key counts twice, and
  share the block's softmax.
- global queries: full rows `[max_global, len]` replace their windowed outputs.
Time is O(len * (strip + max_global)) and memory O(len * (head_dim +
max_global)), with strip = block * (1 + 2 * ceil(window / block)) keys (half
the neighbours when causal). Softmax statistics are float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.attention import base



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
    self.strip = (self.before + 1 + self.after) * block
    self.window_mask = _window_mask(block, self.before, self.after, window, causal)
    self.key = (block, window, causal)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Band) and self.key == other.key


def _rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """`x[:, :, :, start:start + size]`."""
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=3)


def _add_rows(x: jax.Array, start: jax.Array, rows: jax.Array) -> jax.Array:
  """`x` with `rows` added to `x[:, :, :, start:start + len(rows)]`."""
  current = _rows(x, start, rows.shape[3])
  return jax.lax.dynamic_update_slice_in_dim(x, current + rows, start, axis=3)


def _softmax_parts(scores: jax.Array):
  """exp(scores - row max), its row sum and the row max, float32.

  Hidden keys are at MASK_VALUE; a row max at or below MASK_VALUE / 2 means the
  row sees no key.
  """
  # The max only stabilises exp(); it cancels in the result, so no gradient.
  row_max = jax.lax.stop_gradient(scores.max(-1))
  probs = jnp.exp(scores - row_max[..., None])
  return probs, probs.sum(-1), row_max


def _normalise(out: jax.Array, total: jax.Array, row_max: jax.Array) -> jax.Array:
  """out / total, and zeros for rows that see no key."""
  return jnp.where(row_max[..., None] > base.MASK_VALUE / 2, out / total[..., None], 0.0)


def _block_keys(band, start, k, v, valid, global_k, global_v, global_seen):
  """Keys and values a query block may see, and which it does see.

  The keys are the strip of the block (in the padded key layout the strip of
  the block at query `start` starts at key `start`) followed by the global keys.

  Returns:
    keys `[b, r, h, strip + slots, d]`, values likewise, and bool visibility
    `[b, r, 1, block, strip + slots]`.
  """
  keys, values = _rows(k, start, band.strip), _rows(v, start, band.strip)
  visible = _rows(valid, start, band.strip)[..., None, :] & band.window_mask
  if global_k.shape[3]:
    keys = jnp.concatenate([keys, global_k], axis=3)
    values = jnp.concatenate([values, global_v], axis=3)
    visible = jnp.concatenate([visible, _rows(global_seen, start, band.block)], axis=-1)
  return keys, values, visible


def _band_forward(q, k, v, valid, global_k, global_v, global_seen, band):
  """Outputs and log-sum-exp `[b, r, h, queries]` of `_band_core`; lse is +inf where no key is seen."""

  def one_block(carry, i):
    out, lse = carry
    start = i * band.block
    keys, values, visible = _block_keys(band, start, k, v, valid, global_k, global_v,
                                        global_seen)
    scores = jnp.einsum('brhqd,brhkd->brhqk', _rows(q, start, band.block), keys,
                        preferred_element_type=jnp.float32)
    probs, total, row_max = _softmax_parts(jnp.where(visible, scores, base.MASK_VALUE))
    out_i = jnp.einsum('brhqk,brhkd->brhqd', probs.astype(v.dtype), values,
                       preferred_element_type=jnp.float32)
    out_i = _normalise(out_i, total, row_max).astype(q.dtype)
    # +inf makes the probabilities recomputed in the backward pass exactly 0.
    lse_i = jnp.where(row_max > base.MASK_VALUE / 2, row_max + jnp.log(total), jnp.inf)
    out = jax.lax.dynamic_update_slice_in_dim(out, out_i, start, axis=3)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_i, start, axis=3)
    return (out, lse), None

  init = (jnp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype), jnp.zeros(q.shape[:-1], jnp.float32))
  blocks = q.shape[3] // band.block
  return jax.lax.scan(one_block, init, jnp.arange(blocks))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _band_core(q, k, v, valid, global_k, global_v, global_seen, band):
  """Attention of every query block over its strip of keys and the global keys.

  Args:
    q: pre-scaled queries `[batch, r, heads, queries, head_dim]`, queries a
      multiple of `band.block`.
    k: keys `[batch, r, heads, keys, head_dim]`, the queries' positions padded
      with `band.before` blocks in front and `band.after` behind.
    v: values, padded like k.
    valid: bool `[batch, r, 1, keys]`, real keys.
    global_k: global keys `[batch, r, heads, slots, head_dim]` (slots may be 0).
    global_v: global values `[batch, r, heads, slots, value_dim]`.
    global_seen: bool `[batch, r, 1, queries, slots]`, does the query see the
      global key (and it is not already in its window).
    band: static block and strip shape.

  Returns:
    `[batch, r, heads, queries, value_dim]` in the dtype of q.
  """
  return _band_forward(q, k, v, valid, global_k, global_v, global_seen, band)[0]


def _band_core_fwd(q, k, v, valid, global_k, global_v, global_seen, band):
  out, lse = _band_forward(q, k, v, valid, global_k, global_v, global_seen, band)
  return out, (q, k, v, valid, global_k, global_v, global_seen, out, lse)


def _band_core_bwd(band, residuals, dout):
  """FlashAttention-2 backward (Dao 2023, Algorithm 2), one query block at a time."""
  q, k, v, valid, global_k, global_v, global_seen, out, lse = residuals
  # dL/ds = p * (dp - D), with D = rowsum(dO * O).
  delta = jnp.einsum('brhqd,brhqd->brhq', dout.astype(jnp.float32), out.astype(jnp.float32))

  def one_block(carry, i):
    dq, dk, dv, dk_global, dv_global = carry
    start = i * band.block
    query_rows = lambda x: _rows(x, start, band.block)
    q_i, dout_i = query_rows(q), query_rows(dout)
    keys, values, visible = _block_keys(band, start, k, v, valid, global_k, global_v,
                                        global_seen)
    # Scores transposed, keys by queries, so that every product but dq has the
    # layout XLA:CPU multiplies fastest.
    scores = jnp.einsum('brhkd,brhqd->brhkq', keys, q_i, preferred_element_type=jnp.float32)
    scores = jnp.where(jnp.swapaxes(visible, -1, -2), scores, base.MASK_VALUE)
    probs = jnp.exp(scores - query_rows(lse)[..., None, :])
    dp = jnp.einsum('brhkd,brhqd->brhkq', values, dout_i, preferred_element_type=jnp.float32)
    ds = (probs * (dp - query_rows(delta)[..., None, :])).astype(q.dtype)
    dv_keys = jnp.einsum('brhkq,brhqd->brhkd', probs.astype(v.dtype), dout_i,
                         preferred_element_type=jnp.float32)
    dk_keys = jnp.einsum('brhkq,brhqd->brhkd', ds, q_i, preferred_element_type=jnp.float32)
    dq_i = jnp.einsum('brhkq,brhkd->brhqd', ds, keys, preferred_element_type=jnp.float32)
    dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i.astype(q.dtype), start, axis=3)
    dk = _add_rows(dk, start, dk_keys[:, :, :, :band.strip])
    dv = _add_rows(dv, start, dv_keys[:, :, :, :band.strip])
    dk_global += dk_keys[:, :, :, band.strip:]
    dv_global += dv_keys[:, :, :, band.strip:]
    return (dq, dk, dv, dk_global, dv_global), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  init = (jnp.zeros_like(q), zeros(k), zeros(v), zeros(global_k), zeros(global_v))
  blocks = q.shape[3] // band.block
  (dq, dk, dv, dk_global, dv_global), _ = jax.lax.scan(one_block, init, jnp.arange(blocks))
  return (dq, dk.astype(k.dtype), dv.astype(v.dtype), None, dk_global.astype(global_k.dtype),
          dv_global.astype(global_v.dtype), None)


_band_core.defvjp(_band_core_fwd, _band_core_bwd)


def global_selector(global_mask: jax.Array, max_global: int) -> jax.Array:
  """One-hot bool `[batch, slots, len]` of the first `max_global` global tokens of each row.

  Slot s of a row holds its s-th global token, or nothing (all False) when the
  row has fewer; slots = min(max_global, len).
  """
  slots = min(max_global, global_mask.shape[1])
  rank = jnp.cumsum(global_mask, axis=1) - 1
  return global_mask[:, None, :] & (rank[:, None, :] == np.arange(slots)[:, None])


def _global_keys_seen(positions, has_key, query_pos, window, dilation, causal):
  """Bool `[batch, r, 1, queries, slots]`: does a query see a global key outside its window.

  Args:
    positions: int `[batch, slots]`, sequence position of each global key.
    has_key: bool `[batch, slots]`, the slot holds a real (non-padding) key.
    query_pos: int `[r, queries]`, sequence position of each query.
    window, dilation, causal: the window (already capped to the length).
  """
  offset = positions[:, None, None, :] - query_pos[None, :, :, None]  # key minus query
  span = dilation * window
  if causal:
    in_window = (offset <= 0) & (offset >= -span)
  else:
    in_window = jnp.abs(offset) <= span
  in_window &= offset % dilation == 0
  # A global key inside the window is counted there already.
  seen = has_key[:, None, None, :] & ~in_window
  if causal:
    seen &= offset <= 0
  return seen[:, :, None]


def _global_rows(q_global, k, v, valid, key_pos, query_pos, causal):
  """Outputs of global queries over all keys, with keys in flat band layout.

  Args:
    q_global: pre-scaled global queries `[batch, r, heads, slots, head_dim]`
      (the same for every r).
    k: keys `[batch, r, heads, keys, head_dim]`.
    v: values `[batch, r, heads, keys, value_dim]`.
    valid: bool `[batch, r, 1, 1, keys]`, real keys.
    key_pos: int `[r, 1, 1, keys]`, sequence position of each key.
    query_pos: int `[batch, slots]`, sequence position of each global query.
    causal: hide keys after the query.

  Returns:
    `[batch, slots, heads, value_dim]` in the dtype of q.
  """
  scores = jnp.einsum('brhgd,brhkd->brhgk', q_global, k, preferred_element_type=jnp.float32)
  visible = valid
  if causal:
    visible = visible & (key_pos <= query_pos[:, None, None, :, None])
  scores = jnp.where(visible, scores, base.MASK_VALUE)
  # One softmax per global query over the keys of all r subsequences.
  row_max = jax.lax.stop_gradient(scores.max(axis=(1, 4)))
  probs = jnp.exp(scores - row_max[:, None, :, :, None])
  rows = jnp.einsum('brhgk,brhkd->bhgd', probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)
  rows = _normalise(rows, probs.sum(axis=(1, 4)), row_max)
  return rows.astype(q_global.dtype).transpose(0, 2, 1, 3)


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

  sub_len = -(-length // dilation)  # length of each interleaved subsequence
  window = min(window, sub_len - 1)
  if block is None:
    # Measured on CPU: strips of about 2.25 windows beat fewer, larger blocks.
    block = min(max(window // 4, 32), 256)
  block = min(base.round_up(block, 8), base.round_up(sub_len, 8))
  band = _Band(block, window, causal)

  def band_layout(x, pad_value=0, before=0, after=0):
    # Pads the sequence to whole blocks of every subsequence, plus `before`
    # blocks in front and `after` behind.
    x = _to_band_layout(base.pad_axis(x, 1, block * dilation, pad_value), dilation)
    widths = [(0, 0)] * x.ndim
    widths[3] = (before * block, after * block)
    return jnp.pad(x, widths, constant_values=pad_value)

  key_layout = functools.partial(band_layout, before=band.before, after=band.after)
  q_band, k_band, v_band = band_layout(q), key_layout(k), key_layout(v)
  valid = key_layout(key_valid[:, :, None, None], False)[..., 0]  # [batch, r, 1, keys]
  if global_mask is None:
    selector = jnp.zeros((batch, 0, length), bool)
  else:
    selector = global_selector(global_mask, max_global)
  slots = selector.shape[1]
  # Gathering and placing the few global tokens are small matrix products.
  take = lambda x: jnp.einsum('bgn,bnhd->bghd', selector.astype(x.dtype), x)
  positions = jnp.einsum('bgn,n->bg', selector.astype(jnp.int32), np.arange(length))
  # Global tokens in band layout, [batch, r, heads, slots, d], the same for every r.
  band_global = lambda x: jnp.broadcast_to(take(x).transpose(0, 2, 1, 3)[:, None],
                                           (batch, dilation, heads, slots, x.shape[-1]))
  # Sequence position of each query and key in band layout, [r, queries or keys].
  sub_pos = lambda start, stop: np.arange(start, stop) * dilation + np.arange(dilation)[:, None]
  query_pos = sub_pos(0, q_band.shape[3])
  has_key = (selector & key_valid[:, None, :]).any(-1)
  seen = _global_keys_seen(positions, has_key, query_pos, window, dilation, causal)
  out = _band_core(q_band, k_band, v_band, valid, band_global(k), band_global(v), seen, band)
  out = _from_band_layout(out)[:, :length]
  if global_mask is None:
    return out

  key_pos = sub_pos(-band.before * block, k_band.shape[3] - band.before * block)
  rows = _global_rows(band_global(q), k_band, v_band, valid[:, :, :, None],
                      key_pos[:, None, None, :], positions, causal)
  rows = jnp.einsum('bgn,bghd->bnhd', selector.astype(rows.dtype), rows)
  return jnp.where(selector.any(1)[:, :, None, None], rows, out)


def _raise_if_too_many_global(most, max_global: int) -> None:
  """Raises ValueError when a row has more than `max_global` global tokens."""
  if int(most) > max_global:
    raise ValueError(
        f'global_mask has {int(most)} global tokens in a row but max_global={max_global}; '
        'raise max_global')


def check_global_mask(global_mask, batch: int, length: int, max_global: int) -> None:
  """Raises ValueError unless `global_mask` is None or a bool `[batch, len]` within `max_global`.

  With concrete values the count is checked at once; under jit a host callback
  checks it when the step runs, so the error surfaces (as a JaxRuntimeError
  carrying this message) instead of global tokens being silently dropped.
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
  most = global_mask.sum(-1, dtype=jnp.int32).max(initial=0)
  if isinstance(global_mask, jax.core.Tracer):
    jax.debug.callback(_raise_if_too_many_global, most, max_global)
  else:
    _raise_if_too_many_global(most, max_global)


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

  def __call__(self, q, k, v, mask=None, causal=False, global_mask=None, *,
               deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=True)
    check_global_mask(global_mask, q.shape[0], q.shape[1], self.max_global)
    return sliding_window_attention(
        q, k, v, mask, causal, window=self.window, dilation=self.dilation,
        global_mask=global_mask, max_global=self.max_global, block=self.block)
