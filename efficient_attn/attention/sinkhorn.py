"""Sparse Sinkhorn attention (Tay et al. 2020, "Sparse Sinkhorn Attention").

The sequence is cut into blocks of `block_len` tokens (padded to whole
blocks). A sorting network scores every pair of blocks, R [n_blocks,
n_blocks] (the paper's "SortNet"); Sinkhorn normalisation of
exp(R / temperature) in log space, `sinkhorn_iters` rounds of row then column
normalisation (S^0 = exp(R), S^k = F_c(F_r(S^{k-1}))), optionally with Gumbel
noise added to R (Gumbel-Sinkhorn, Mena et al. 2018), turns it into a soft
permutation P. Keys and values are sorted by blocks, K_sorted_i = sum_j P_ij K_j
(the paper's psi_S), and each query block attends with one softmax over
2 * block_len keys: its own block and its sorted block (one softmax over both,
as lucidrains' sinkhorn-transformer does). With one block (block_len >= n) P is
1 and this is exact attention. Cost O(n * block_len) for the attention plus
O(n_blocks^2 * block_len * d) for the sort; the attention over blocks is a
small dense softmax per block (block x 2 * block), differentiated by autodiff.

Sorting network: R_ij = mean(q of block i) . mean(k of block j) / sqrt(d),
content-based and learned through the layer's query and key projections (as
lucidrains' sinkhorn-transformer `AttentionSortNet` does). The paper's SortNet
is an MLP from the block's summed inputs to n_blocks outputs, and the public LRA
code a dense layer from summed keys to `max_num_blocks` outputs sliced to the
block count; both tie the parameters to a maximum length and to head_dim, which
this interface's modules are built without.

Padding: padded keys and values are zeroed before pooling and sorting, and a
sorted key is the P-weighted mean of the real keys at its offset (the sorted
validity: its weight on real keys is > 0), so padding never leaks through the
sorted blocks. The mask marks padded queries too (this is self-attention:
q_len == kv_len); they are left out of the block means.

Causal (the paper's "Causal Sinkhorn Balancing"): the sorted block of query
block i mixes only past blocks j < i, and the local block is causally masked.
Row i of R uses only the first query of block i (the public LRA code also keeps
only the first token of each block, `cumsum(...)[:, 0]`), so every query of the
block may read it, and P_i is the softmax of R_i / temperature over j < i: the
row normalisation alone. A column normalisation sums each column over rows of
later blocks, so any Sinkhorn iteration would let the future leak into P_i: the
public LRA code's causal operator (its `sinkhorn_operator`, marked "TODO: verify
causal sinkhorn ops") normalises column j over all rows i' >= j; normalising it
over rows i' <= i instead is causal but forces P_{i, i-1} = 1 (the newest column
has one entry), a fixed look-back rather than a sort. The masked row softmax is
also what the LRA code runs in causal mode by default (`sort_activation`
'softmax' with a causal mask). `sinkhorn_iters` applies to the non-causal case.
Block 0 has no sorted block.

Other differences from the public LRA code: it sums two separate softmaxes (own
block and sorted block), which with one block would not be exact attention; its
default `sort_activation` is a plain softmax over rows (no Sinkhorn iterations,
no Gumbel noise).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base


def sinkhorn(log_alpha: jax.Array, iters: int, causal: bool = False) -> jax.Array:
  """The Sinkhorn normalisation of exp(log_alpha) over the last two axes.

  Args:
    log_alpha: float32 `[..., n, n]` logits.
    iters: rounds of row then column normalisation, in log space.
    causal: keep only entries (i, j) with j < i and normalise rows over them
      (`iters` does not apply; see the module docstring).

  Returns:
    float32 `[..., n, n]`: doubly stochastic in the limit of many iterations;
    causal, rows sum to 1 over j < i (row 0 is zero).
  """
  if causal:
    allowed = jnp.tri(log_alpha.shape[-1], k=-1, dtype=bool)
    log_alpha = jnp.where(allowed, log_alpha, base.MASK_VALUE)
    return jnp.where(allowed, jax.nn.softmax(log_alpha, axis=-1), 0.0)
  for _ in range(iters):
    log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-1, keepdims=True)
    log_alpha = log_alpha - jax.nn.logsumexp(log_alpha, axis=-2, keepdims=True)
  return jnp.exp(log_alpha)


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """`[batch, len, heads, d]` -> `[batch, heads, n_blocks, block, d]`, padded with zeros."""
  x = base.pad_axis(x, 1, block)
  b, n, h, d = x.shape
  return x.reshape(b, n // block, block, h, d).transpose(0, 3, 1, 2, 4)


def _block_means(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Float32 means `[B, H, nb, d]` of the valid rows of each block (0 where none is)."""
  count = valid.sum(-1, dtype=jnp.float32)[:, None, :, None]
  total = jnp.einsum('bhntd,bnt->bhnd', x, valid.astype(x.dtype),
                     preferred_element_type=jnp.float32)
  return total / jnp.maximum(count, 1.0)


def sort_logits(q_blocks: jax.Array, k_blocks: jax.Array, valid: jax.Array,
                causal: bool) -> jax.Array:
  """The sorting network's block logits R `[B, H, nb, nb]` (float32).

  Args:
    q_blocks: `[B, H, nb, block, d]` queries by blocks.
    k_blocks: `[B, H, nb, block, d]` keys by blocks.
    valid: bool `[B, nb, block]`, False at padding.
    causal: rows from the first query of each block only.

  Returns:
    R_ij = (query summary of block i) . (mean real key of block j) / sqrt(d).
  """
  if causal:
    rows = jnp.where(valid[:, None, :, 0, None], q_blocks[:, :, :, 0], 0).astype(jnp.float32)
  else:
    rows = _block_means(q_blocks, valid)
  columns = _block_means(k_blocks, valid)
  return jnp.einsum('bhid,bhjd->bhij', rows, columns) * base.default_scale(q_blocks.shape[-1])


def sort_blocks(permutation: jax.Array, x_blocks: jax.Array,
                valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sorted blocks sum_j P_ij x_j over real rows, and their validity.

  Args:
    permutation: float32 `[B, H, nb, nb]` soft permutation P.
    x_blocks: `[B, H, nb, block, d]`, anything at padding.
    valid: bool `[B, nb, block]`, False at padding.

  Returns:
    (sorted `[B, H, nb, block, d]` in the dtype of x, the P-weighted mean of
    the real rows at each offset; bool `[B, H, nb, block]`, True where that
    weight is > 0).
  """
  weights = jnp.einsum('bhij,bjt->bhit', permutation, valid.astype(jnp.float32))
  x = jnp.where(valid[:, None, :, :, None], x_blocks, 0)
  total = jnp.einsum('bhij,bhjtd->bhitd', permutation.astype(x.dtype), x,
                     preferred_element_type=jnp.float32)
  seen = weights > 0
  out = total / jnp.where(seen, weights, 1.0)[..., None]
  return out.astype(x_blocks.dtype), seen


def _block_attention(q, k, v, visible):
  """Softmax attention per block: q `[..., bq, d]` over k, v `[..., bk, d]`, visible bool `[..., bq, bk]`.

  Returns the output in the dtype of q; zeros for rows that see no key.
  """
  s = jnp.einsum('...qd,...kd->...qk', q, k, preferred_element_type=jnp.float32)
  s = jnp.where(visible, s, base.MASK_VALUE)
  p = jnp.exp(s - s.max(-1, keepdims=True))
  out = jnp.einsum('...qk,...kd->...qd', p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out / p.sum(-1, keepdims=True)
  return jnp.where(visible.any(-1, keepdims=True), out, 0.0).astype(q.dtype)


def sinkhorn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                       causal: bool = False, block_len: int = 50, sinkhorn_iters: int = 7,
                       temperature: float = 0.75, noise: jax.Array | None = None,
                       scale: float | None = None) -> jax.Array:
  """Sparse Sinkhorn attention (Tay et al. 2020): own block plus a soft-sorted block.

  Args:
    q: `[batch, len, heads, head_dim]`.
    k: `[batch, len, heads, head_dim]`.
    v: `[batch, len, heads, value_dim]`.
    mask: None or bool `[batch, len]`, True for real tokens (keys and queries).
    causal: query i sees keys j <= i only.
    block_len: tokens per block; the length is padded to whole blocks.
    sinkhorn_iters: rounds of Sinkhorn normalisation.
    temperature: the logits R are divided by it before normalisation.
    noise: None, or float32 `[batch, heads, n_blocks, n_blocks]` added to R
      before dividing (standard Gumbel noise for Gumbel-Sinkhorn).
    scale: logit scale of the attention, default 1/sqrt(head_dim).

  Returns:
    `[batch, len, heads, value_dim]` in the dtype of q; zeros for queries that
    see no key.
  """
  base.check_inputs(q, k, v, mask, self_attention=True)
  base.check_positive_int('block_len', block_len)
  base.check_positive_int('sinkhorn_iters', sinkhorn_iters)
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature!r}')
  batch, length, _, head_dim = q.shape
  scale = base.default_scale(head_dim) if scale is None else scale
  valid = base.pad_axis(base.key_mask_or_ones(mask, batch, length), 1, block_len, False)
  valid = valid.reshape(batch, -1, block_len)
  n_blocks = valid.shape[1]
  if noise is not None and noise.shape != (batch, q.shape[2], n_blocks, n_blocks):
    raise ValueError(f'noise must have shape [batch, heads, n_blocks, n_blocks] = '
                     f'{(batch, q.shape[2], n_blocks, n_blocks)}, got {noise.shape}')
  qb, kb, vb = (_blocks(x, block_len) for x in (q, k, v.astype(q.dtype)))
  logits = sort_logits(qb, kb, valid, causal)
  if noise is not None:
    logits = logits + noise
  permutation = sinkhorn(logits / temperature, sinkhorn_iters, causal)
  k_sorted, sorted_valid = sort_blocks(permutation, kb, valid)
  v_sorted, _ = sort_blocks(permutation, vb, valid)
  local = jnp.broadcast_to(valid[:, None, :, None, :], qb.shape[:4] + (block_len,))
  if causal:
    local = local & jnp.tri(block_len, dtype=bool)
  visible = jnp.concatenate(
      [local, jnp.broadcast_to(sorted_valid[:, :, :, None, :], local.shape)], axis=-1)
  out = _block_attention(qb * jnp.asarray(scale, q.dtype),
                         jnp.concatenate([kb, k_sorted], axis=-2),
                         jnp.concatenate([vb, v_sorted], axis=-2), visible)
  b, h, nb, block, dv = out.shape
  return out.transpose(0, 2, 3, 1, 4).reshape(b, nb * block, h, dv)[:, :length]


@base.register_attention('sinkhorn')
class SinkhornAttention(base.RandomAttention):
  """Sparse Sinkhorn attention; options documented in `sinkhorn_attention`.

  Options: `block_len` (50, the public LRA code's block size), `sinkhorn_iters`
  (7) and `temperature` (0.75), the settings the paper reports best (as in
  lucidrains' sinkhorn-transformer defaults), and `gumbel_noise` (False, as
  the public LRA code).

  Random state (redraw policy): with `gumbel_noise=True`, each training call
  adds fresh standard Gumbel noise to the sorting logits, from the call's
  `rngs` when given (module state untouched, so plain `jax.jit` / `jax.grad`
  work), else from the module's 'attention' stream (or 'default', else
  'params'); a call with `deterministic=True` (or after `.eval()`) adds none,
  the noise-free sorting, as dropout is off at evaluation.
  """

  def __init__(self, block_len: int = 50, sinkhorn_iters: int = 7, temperature: float = 0.75,
               gumbel_noise: bool = False, *, rngs: nnx.Rngs):
    base.check_positive_int('block_len', block_len)
    base.check_positive_int('sinkhorn_iters', sinkhorn_iters)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        temperature > 0):
      raise ValueError(f'temperature must be a number > 0, got {temperature!r}')
    base.check_choice('gumbel_noise', gumbel_noise, (False, True))
    self.block_len = block_len
    self.sinkhorn_iters = sinkhorn_iters
    self.temperature = temperature
    self.gumbel_noise = gumbel_noise
    super().__init__(rngs)

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=True)
    noise = None
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.gumbel_noise and not deterministic:
      n_blocks = -(-q.shape[1] // self.block_len)
      shape = (q.shape[0], q.shape[2], n_blocks, n_blocks)
      noise = jax.random.gumbel(self.call_key(False, rngs), shape, jnp.float32)
    return sinkhorn_attention(q, k, v, mask, causal, self.block_len, self.sinkhorn_iters,
                              self.temperature, noise)
