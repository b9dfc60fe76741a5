"""Linformer attention (Wang et al. 2020): keys and values projected along the length axis.

Each head computes softmax(q (E k)^T / sqrt(d)) (F v) (Wang et al. 2020, Eq. 7),
where E and F are learned `[proj_len, max_len]` matrices mapping the `kv_len` key
positions to `proj_len` projected positions, so time and memory are
O((q_len + kv_len) * proj_len) instead of O(q_len * kv_len).

Conventions of this implementation:
- Shorter inputs use the first `kv_len` columns of E and F (as the paper's
  fairseq code does), so `kv_len` may be anything up to `max_len`.
- Padding keys and values are zeroed before the projection, so they contribute
  nothing to E k or F v. A projected position that no real key reaches (its
  rows of E and F are zero at every real key) is made only of padding and is
  hidden like a padding key. For a dense E this hides nothing
  unless every key is padding; with E = F = identity it hides exactly the
  padding keys, so that limit equals exact masked attention.
- The attention over the projected positions is exact softmax attention,
  computed by `blocked_attention`, so memory stays linear in `q_len`.
- Causal attention is not possible: every projected position mixes all key
  positions, future ones included.
- Sharing (the paper's parameter-sharing options): `per_head=False` shares E and
  F across heads (headwise sharing, the default of the paper's code);
  `share='kv'` uses one matrix for both (key-value sharing). Layerwise sharing
  is a model-level choice and is not done here.
- Initialisation as in the paper's code (fairseq `MultiheadLinearAttention`):
  Xavier uniform with gain 1/sqrt(2) over `[proj_len, max_len]`, that is
  U(-a, a) with a = sqrt(3 / (proj_len + max_len)), for each head's matrix.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base
from efficient_attn.attention.blocked import blocked_attention

SHARES = ('none', 'kv')

# Xavier uniform with gain 1/sqrt(2) over (proj_len, max_len), applied per head.
_init_projection = nnx.initializers.variance_scaling(
    0.5, 'fan_avg', 'uniform', in_axis=-1, out_axis=-2, batch_axis=(0,))


def _check_projection(name: str, projection: jax.Array, heads: int, kv_len: int) -> None:
  """Raises ValueError unless `projection` is `[(heads,) proj_len, max_len >= kv_len]`."""
  if projection.ndim not in (2, 3):
    raise ValueError(
        f'{name} must be [proj_len, max_len] or [heads, proj_len, max_len], '
        f'got shape {projection.shape}')
  if projection.ndim == 3 and projection.shape[0] != heads:
    raise ValueError(
        f'{name} has one projection per head for {projection.shape[0]} heads, '
        f'but the inputs have {heads} heads')
  if kv_len > projection.shape[-1]:
    raise ValueError(
        f'kv_len={kv_len} exceeds max_len={projection.shape[-1]}: the length '
        'projection has no columns for the extra positions; use a larger max_len')


def project_length(x: jax.Array, projection: jax.Array) -> jax.Array:
  """Projects the length axis: `[batch, kv_len, heads, dim]` -> `[batch, proj_len, heads, dim]`.

  Args:
    x: keys or values `[batch, kv_len, heads, dim]`.
    projection: `[proj_len, kv_len]` shared by all heads, or
      `[heads, proj_len, kv_len]`, in the dtype of `x`.

  Returns:
    `projection @ x` along the length axis, `[batch, proj_len, heads, dim]`, float32.
  """
  b, n, h, d = x.shape
  if projection.ndim == 2:
    # Heads and features as one axis: a single matrix product per batch row.
    out = jnp.einsum('pn,bnc->bpc', projection, x.reshape(b, n, h * d),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, -1, h, d)
  # Heads first, so that each head's product is one plain matrix product.
  return jnp.einsum('hpn,bhnd->bphd', projection, x.transpose(0, 2, 1, 3),
                    preferred_element_type=jnp.float32)


def projected_visibility(key_mask: jax.Array, key_projection: jax.Array,
                         value_projection: jax.Array) -> jax.Array:
  """Whether some real key reaches each projected position (bool).

  Args:
    key_mask: bool `[batch, kv_len]`, True for real keys.
    key_projection: `[(heads,) proj_len, kv_len]`.
    value_projection: the same shape as `key_projection`.

  Returns:
    bool `[batch, heads or 1, proj_len]`: True where E or F has a nonzero
    weight on at least one real key.
  """
  proj_len, kv_len = key_projection.shape[-2:]
  reaches = (key_projection != 0) | (value_projection != 0)
  reaches = reaches.reshape(-1, kv_len).astype(jnp.float32)
  real_keys = jnp.einsum('xn,bn->bx', reaches, key_mask.astype(jnp.float32))
  return (real_keys > 0).reshape(key_mask.shape[0], -1, proj_len)


def _heads_to_batch(x: jax.Array) -> jax.Array:
  """`[batch, len, heads, dim]` -> `[batch * heads, len, 1, dim]`."""
  b, n, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, n, 1, d)


def _batch_to_heads(x: jax.Array, heads: int) -> jax.Array:
  """Inverse of `_heads_to_batch`."""
  bh, n, _, d = x.shape
  return x.reshape(bh // heads, heads, n, d).transpose(0, 2, 1, 3)


def linformer_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        key_projection: jax.Array, value_projection: jax.Array,
                        mask: jax.Array | None = None,
                        scale: float | None = None) -> jax.Array:
  """Linformer attention softmax(q (E k)^T * scale) (F v), padding-aware.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    key_projection: E, `[proj_len, max_len]` shared by all heads or
      `[heads, proj_len, max_len]`, with `max_len >= kv_len`; its first
      `kv_len` columns are used.
    value_projection: F, the same shape as E (pass E again to share it).
    mask: None or bool `[batch, kv_len]`, True for real keys.
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries
    whose keys are all padding.
  """
  batch, _, heads, _ = q.shape
  kv_len = k.shape[1]
  _check_projection('key_projection', key_projection, heads, kv_len)
  _check_projection('value_projection', value_projection, heads, kv_len)
  if key_projection.shape != value_projection.shape:
    raise ValueError(
        f'key_projection and value_projection must have one shape, got '
        f'{key_projection.shape} and {value_projection.shape}')
  key_projection = key_projection[..., :kv_len].astype(k.dtype)
  value_projection = value_projection[..., :kv_len].astype(v.dtype)
  if mask is not None:
    real = mask[:, :, None, None]
    k = jnp.where(real, k, jnp.zeros((), k.dtype))
    v = jnp.where(real, v, jnp.zeros((), v.dtype))
  projected_k = project_length(k, key_projection).astype(k.dtype)
  projected_v = project_length(v, value_projection).astype(v.dtype)
  visible = projected_visibility(base.key_mask_or_ones(mask, batch, kv_len),
                                 key_projection, value_projection)
  # Exact attention over the projected positions, by blocks of queries.
  if key_projection.ndim == 2:
    return blocked_attention(q, projected_k, projected_v, visible[:, 0], scale=scale)
  out = blocked_attention(_heads_to_batch(q), _heads_to_batch(projected_k),
                          _heads_to_batch(projected_v), visible.reshape(batch * heads, -1),
                          scale=scale)
  return _batch_to_heads(out, heads)


@base.register_attention('linformer')
class LinformerAttention(base.Attention):
  """Linformer attention with learned length projections E and F.

  Options: `max_len` is the longest key length accepted (default 4096, enough
  for the Long Range Arena tasks up to 4K; set it to the input length for longer
  inputs); `k` the number of projected positions; `share` 'none' (separate E, F)
  or 'kv' (one matrix for both); `per_head` one projection per head, which needs
  `num_heads`. When given, `num_heads` is checked against the inputs.
  """

  supports_causal = False

  def __init__(self, max_len: int = 4096, k: int = 256, share: str = 'none',
               per_head: bool = False, num_heads: int | None = None, *, rngs: nnx.Rngs):
    base.check_positive_int('max_len', max_len)
    base.check_positive_int('k', k)
    base.check_choice('share', share, SHARES)
    base.check_choice('per_head', per_head, (False, True))
    if num_heads is not None:
      base.check_positive_int('num_heads', num_heads)
    if per_head and num_heads is None:
      raise ValueError('per_head=True needs num_heads, the number of heads to project for')
    self.max_len = max_len
    self.k = k
    self.share = share
    self.per_head = per_head
    self.num_heads = num_heads
    shape = (num_heads if per_head else 1, k, max_len)
    self.key_projection = nnx.Param(self._squeeze(_init_projection(rngs.params(), shape)))
    self.value_projection = (
        nnx.Param(self._squeeze(_init_projection(rngs.params(), shape)))
        if share == 'none' else None)

  def _squeeze(self, projection: jax.Array) -> jax.Array:
    """Drops the head axis of a projection shared by all heads."""
    return projection if self.per_head else projection[0]

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask)
    if causal:
      raise ValueError(
          'linformer does not support causal=True: the length projection mixes '
          'every key position, future ones included, into each projected key')
    if self.num_heads is not None and q.shape[2] != self.num_heads:
      raise ValueError(
          f'num_heads={self.num_heads} but the inputs have {q.shape[2]} heads')
    key_projection = self.key_projection[...]
    value_projection = key_projection
    if self.value_projection is not None:
      value_projection = self.value_projection[...]
    return linformer_attention(q, k, v, key_projection, value_projection, mask)
