"""Exact softmax attention, softmax(q k^T / sqrt(d)) v, with several backends."""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base
from efficient_attn.attention.blocked import blocked_attention

BACKENDS = ('dense', 'blocked', 'xla', 'cudnn', 'auto')


def visibility(mask: jax.Array | None, causal: bool, batch: int, q_len: int,
               kv_len: int) -> jax.Array:
  """Bool `[batch, 1, q_len, kv_len]`: may query i see key j (padding and causality)."""
  visible = base.key_mask_or_ones(mask, batch, kv_len)[:, None, None, :]
  if causal:
    rows = jnp.arange(q_len)[:, None]
    cols = jnp.arange(kv_len)[None, :]
    visible = visible & (cols <= rows)
  return jnp.broadcast_to(visible, (batch, 1, q_len, kv_len))


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None = None, causal: bool = False,
                    scale: float | None = None) -> jax.Array:
  """Exact attention with the full score matrix materialised: the test oracle.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    mask: None or bool `[batch, kv_len]`, True for real keys.
    causal: query i sees keys j <= i only.
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries
    with no visible key.
  """
  scale = base.default_scale(q.shape[-1]) if scale is None else scale
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  visible = visibility(mask, causal, q.shape[0], q.shape[1], k.shape[1])
  scores = jnp.where(visible, scores, base.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _pad_last(x: jax.Array, size: int) -> jax.Array:
  """Zero-pads the last axis of x to `size`."""
  if x.shape[-1] == size:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _query_sees_key(mask: jax.Array, causal: bool, q_len: int) -> jax.Array:
  """Bool `[batch, q_len]`: does the query see at least one real key."""
  if causal:
    # Query i sees a real key iff one of keys 0..i is real.
    seen = jnp.cumsum(mask, axis=-1) > 0
    return seen[:, jnp.minimum(jnp.arange(q_len), mask.shape[1] - 1)]
  return jnp.broadcast_to(mask.any(-1, keepdims=True), (mask.shape[0], q_len))


def xla_attention(q, k, v, mask=None, causal=False, scale=None, implementation='xla',
                  key_lengths=None):
  """`jax.nn.dot_product_attention`, any value_dim, queries that see no key set to zero.

  Args:
    q, k, v, mask, causal, scale: as in `dense_attention`.
    implementation: 'xla' or 'cudnn'.
    key_lengths: None, or int `[batch]` real keys per row when `mask` is a prefix
      mask; then passed as `key_value_seq_lengths` instead of the mask.

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q.
  """
  head_dim, value_dim = q.shape[-1], v.shape[-1]
  scale = base.default_scale(head_dim) if scale is None else scale
  # jax needs value_dim == head_dim: zero columns change neither q.k nor the output.
  width = max(head_dim, value_dim)
  q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)
  key_mask = None if mask is None or key_lengths is not None else mask[:, None, None, :]
  out = jax.nn.dot_product_attention(
      q, k, v, mask=key_mask, is_causal=causal, scale=scale,
      key_value_seq_lengths=key_lengths, implementation=implementation)[..., :value_dim]
  if mask is None:
    return out
  # jax averages v over hidden keys when a query sees none; the contract is zeros.
  sees_key = _query_sees_key(mask, causal, q.shape[1])
  return jnp.where(sees_key[:, :, None, None], out, jnp.zeros_like(out))


def pallas_tpu_attention(q, k, v, mask=None, causal=False, scale=None):
  """The Pallas TPU flash-attention kernel that ships with jax; padding through segment ids."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  scale = base.default_scale(q.shape[-1]) if scale is None else scale
  segment_ids = None
  if mask is not None:
    # A query (segment 1) sees only keys of its own segment: real keys.
    segment_ids = tpu_flash.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32),
                                       kv=mask.astype(jnp.int32))
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = heads_first(tpu_flash.flash_attention(
      heads_first(q), heads_first(k), heads_first(v), segment_ids=segment_ids,
      causal=causal, sm_scale=scale))
  if mask is None:
    return out
  sees_key = _query_sees_key(mask, causal, q.shape[1])
  return jnp.where(sees_key[:, :, None, None], out, jnp.zeros_like(out))


def is_prefix_mask(mask: jax.Array) -> jax.Array:
  """Bool scalar: every row of `mask` is True on a prefix and False after it."""
  lengths = mask.sum(-1, dtype=jnp.int32)
  return jnp.all(mask == (jnp.arange(mask.shape[1]) < lengths[:, None]))


def cudnn_supports(q, k, v) -> bool:
  """Whether cuDNN flash attention takes these shapes and dtypes (any mask handled apart)."""
  return (q.dtype in (jnp.float16, jnp.bfloat16)
          and q.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def pallas_tpu_supports(q, k, v) -> bool:
  """Whether the Pallas TPU flash-attention kernel takes these shapes (128-row blocks)."""
  return (q.shape[-1] == v.shape[-1] and q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0)


def select_backend(backend: str, q, k, v, platform: str | None = None) -> str:
  """The path a call takes: 'dense', 'blocked', 'xla', 'cudnn' or 'pallas_tpu'.

  'auto' picks cuDNN flash attention on GPU where it supports the shapes and
  dtype (a padding mask then goes through `key_value_seq_lengths` when it is a
  prefix mask, checked at run time, else through `blocked`), the Pallas kernel
  on TPU where its block constraints hold, and `blocked` otherwise.

  Args:
    backend: one of BACKENDS.
    q, k, v: the inputs (only shapes and dtypes are read).
    platform: 'cpu', 'gpu' or 'tpu'; default `jax.default_backend()`.
  """
  platform = jax.default_backend() if platform is None else platform
  if backend == 'cudnn' and platform != 'gpu':
    raise ValueError(f"backend='cudnn' needs a GPU, but the platform is {platform!r}; "
                     "use backend='auto' to pick the fastest available path")
  if backend == 'cudnn' and not cudnn_supports(q, k, v):
    raise ValueError(
        "backend='cudnn' needs float16 or bfloat16 inputs with head_dim == value_dim, a "
        f"multiple of 8 and at most 128; got {q.dtype}, head_dim {q.shape[-1]}, "
        f"value_dim {v.shape[-1]}")
  if backend != 'auto':
    return backend
  if platform == 'gpu' and cudnn_supports(q, k, v):
    return 'cudnn'
  if platform == 'tpu' and pallas_tpu_supports(q, k, v):
    return 'pallas_tpu'
  return 'blocked'


@base.register_attention('full')
class FullAttention(base.Attention):
  """Exact softmax attention; `backend` picks how it is computed (see `select_backend`)."""

  def __init__(self, backend: str = 'auto', q_block: int = 512, kv_block: int = 512,
               *, rngs: nnx.Rngs | None = None):
    base.check_choice('backend', backend, BACKENDS)
    base.check_positive_int('q_block', q_block)
    base.check_positive_int('kv_block', kv_block)
    self.backend = backend
    self.q_block = q_block
    self.kv_block = kv_block

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask)
    backend = select_backend(self.backend, q, k, v)
    blocked = lambda: blocked_attention(q, k, v, mask, causal, q_block=self.q_block,
                                        kv_block=self.kv_block)
    if backend == 'dense':
      return dense_attention(q, k, v, mask, causal)
    if backend == 'blocked':
      return blocked()
    if backend == 'pallas_tpu':
      return pallas_tpu_attention(q, k, v, mask, causal)
    if backend == 'xla':
      return xla_attention(q, k, v, mask, causal)
    if mask is None or self.backend == 'cudnn':
      return xla_attention(q, k, v, mask, causal, implementation='cudnn')
    # A prefix mask is a length per row, which the cuDNN kernel takes directly.
    lengths = mask.sum(-1, dtype=jnp.int32)
    cudnn = lambda: xla_attention(q, k, v, mask, causal, implementation='cudnn',
                                  key_lengths=lengths)
    return jax.lax.cond(is_prefix_mask(mask), cudnn, blocked)
