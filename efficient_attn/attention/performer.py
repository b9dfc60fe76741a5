"""Performer attention (Choromanski et al. 2021, FAVOR+): softmax attention by random features.

The softmax kernel exp(q.k / sqrt(d)) is estimated by phi(q).phi(k) with positive
orthogonal random features, so that attention becomes D^-1 (phi(Q) (phi(K)^T V))
(Eq. 4 of the paper) at a cost linear in length, by `kernelized.feature_attention`:
the sequence is processed in blocks whose features are recomputed in the
backward pass, so that no `[length, num_features]` array is ever stored (the
causal scan keeps one `[num_features, head_dim]` prefix sum per chunk).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base, kernelized

KERNELS = ('softmax', 'relu')
REDRAW_POLICIES = ('fixed', 'every_call')
# Added to ReLU features so that every visible key keeps a positive weight.
RELU_EPS = 1e-3
# Added to stabilised softmax features (relative to the largest, 1 before the
# 1/sqrt(m) factor) so that no normaliser of a visible query underflows to 0.
SOFTMAX_EPS = 1e-6


def orthonormal_factor(matrices: jax.Array) -> jax.Array:
  """The Q of the QR decomposition of each square matrix, the one with diag(R) > 0.

  By classical Gram-Schmidt with a second pass ("twice is enough", Giraud et al.
  2005), which keeps Q orthogonal to float32 precision for Gaussian matrices.
  With diag(R) > 0, Q of a Gaussian matrix is uniform over rotations. Not
  `jnp.linalg.qr`: its LAPACK call stalls the training step on CPU from time to
  time (jaxlib 0.10.2; `python -m experiments.lra_speed_memory --attention performer`
  showed it).

  Args:
    matrices: `[..., dim, dim]`, full rank.

  Returns:
    `[..., dim, dim]`, orthonormal columns.
  """
  dim = matrices.shape[-1]

  def next_column(j, q):
    column = matrices[..., :, j]
    for _ in range(2):  # the columns of q from j on are still zero
      column = column - jnp.einsum('...ik,...k->...i', q,
                                   jnp.einsum('...ik,...i->...k', q, column))
    column = column / jnp.linalg.norm(column, axis=-1, keepdims=True)
    return q.at[..., :, j].set(column)

  return jax.lax.fori_loop(0, dim, next_column, jnp.zeros_like(matrices))


@functools.partial(jax.jit, static_argnames=('num_features', 'dim'))
def draw_orthogonal_features(key: jax.Array, num_features: int, dim: int) -> jax.Array:
  """Draws orthogonal random features whose rows are marginally N(0, I_dim).

  Rows come in blocks of `dim` mutually orthogonal unit vectors (the Q factors,
  uniform over rotations, of Gaussian matrices), each row then rescaled by the
  norm of an independent Gaussian vector, a chi_dim draw (Section 2.4 of the paper).

  Args:
    key: a jax random key.
    num_features: number of rows m.
    dim: the dimension of queries and keys.

  Returns:
    float32 `[num_features, dim]`.
  """
  num_blocks = -(-num_features // dim)
  gaussian = jax.random.normal(key, (num_blocks * dim + num_features, dim), jnp.float32)
  q = orthonormal_factor(gaussian[:num_blocks * dim].reshape(num_blocks, dim, dim))
  directions = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
  norms = jnp.linalg.norm(gaussian[num_blocks * dim:], axis=-1)
  return directions * norms[:, None]


def softmax_exponent(x: jax.Array, features: jax.Array) -> jax.Array:
  """w.x - |x|^2/2 for every feature w: the log of phi(x) up to log(m)/2, float32."""
  projected = jnp.einsum('...d,md->...m', x, features.astype(x.dtype),
                         preferred_element_type=jnp.float32)
  sq_norm = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  return projected - 0.5 * sq_norm


def random_features(x: jax.Array, features: jax.Array, kernel: str = 'softmax',
                    subtract_row_max: bool = False, shift: jax.Array | None = None,
                    valid: jax.Array | None = None) -> jax.Array:
  """The feature map phi of queries or keys.

  softmax: phi(x) = exp(w.x - |x|^2/2) / sqrt(m), so that exp(x.y) =
  E[phi(x).phi(y)] (Lemma 1). relu: phi(x) = relu(w.x) / sqrt(m) + eps, the
  generalized attention of the paper. The softmax stabilisers scale phi by a
  constant per row or per slice, which cancels in attention's normalisation;
  stabilised features get eps / sqrt(m) added (as in the paper's code), so that
  a query's normaliser cannot underflow to zero.

  Args:
    x: `[..., dim]`, already scaled (by dim^-1/4 for softmax attention).
    features: `[m, dim]` random features from `draw_orthogonal_features`.
    kernel: 'softmax' or 'relu'.
    subtract_row_max: softmax only; subtract each row's largest exponent
      (queries).
    shift: softmax only; None or float32 broadcastable to `[..., m]`, subtracted
      from the exponent (keys: the largest exponent over all keys).
    valid: None or bool broadcastable to `[..., m]`; False rows get zero features.

  Returns:
    `[..., m]` non-negative features in the dtype of `x`.
  """
  scale = features.shape[0]**-0.5
  if kernel == 'relu':
    projected = jnp.einsum('...d,md->...m', x, features.astype(x.dtype),
                           preferred_element_type=jnp.float32)
    phi = jax.nn.relu(projected) * scale + RELU_EPS
  else:
    exponent = softmax_exponent(x, features)
    if subtract_row_max:
      exponent -= jax.lax.stop_gradient(jnp.max(exponent, axis=-1, keepdims=True))
    if shift is not None:
      exponent -= shift
    phi = jnp.exp(exponent)
    if subtract_row_max or shift is not None:
      phi += SOFTMAX_EPS
    phi *= scale
  if valid is not None:
    phi = jnp.where(valid, phi, 0.0)
  return phi.astype(x.dtype)


def _key_shift(k_blocks: jax.Array, valid_blocks: jax.Array, features: jax.Array) -> jax.Array:
  """The largest softmax exponent over valid keys and features, per batch and head.

  Subtracting it bounds the key features by about 1/sqrt(m) without changing
  the attention output; padding keys do not enter it. Computed block by block.

  Returns:
    float32 `[batch, heads, 1, 1]`, zero where no key is valid; no gradient.
  """

  def block_max(blocks):
    k, valid = blocks
    return jnp.max(jnp.where(valid, softmax_exponent(k, features), -jnp.inf), axis=(-2, -1))

  largest = jnp.max(jax.lax.map(block_max, (k_blocks, valid_blocks)), axis=0)
  largest = jnp.where(jnp.isfinite(largest), largest, 0.0)
  return jax.lax.stop_gradient(largest)[..., None, None]


def favor_attention(q: jax.Array, k: jax.Array, v: jax.Array, features: jax.Array,
                    mask: jax.Array | None = None, causal: bool = False,
                    kernel: str = 'softmax', chunk_len: int = 64,
                    block_len: int = 256) -> jax.Array:
  """FAVOR+ attention, an estimate of softmax attention by random features.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    features: float32 `[num_features, head_dim]` from `draw_orthogonal_features`.
    mask: None or bool `[batch, kv_len]`, True for real keys.
    causal: query i sees keys j <= i only (needs q_len == kv_len).
    kernel: 'softmax' (FAVOR+) or 'relu' (generalized attention).
    chunk_len: chunk length of the causal prefix sums.
    block_len: positions per block in non-causal attention (a memory/speed
      trade-off only).

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  batch, _, _, head_dim = q.shape
  kv_len = k.shape[1]
  data_scale = jnp.asarray(head_dim**-0.25, q.dtype)
  q, k = q * data_scale, k * data_scale
  key_shift = None
  if kernel == 'softmax':
    block = kernelized.block_size(kv_len, causal, chunk_len, block_len)
    key_mask = base.key_mask_or_ones(mask, batch, kv_len)
    key_shift = _key_shift(kernelized.to_blocks(k, block),
                           kernelized.mask_blocks(key_mask, block), features)

  def query_features(x):
    return random_features(x, features, kernel, subtract_row_max=True)

  def key_features(x, valid):
    return random_features(x, features, kernel, shift=key_shift, valid=valid)

  return kernelized.feature_attention(q, k, v, query_features, key_features,
                                      features.shape[0], mask, causal, chunk_len, block_len)


@base.register_attention('performer')
class PerformerAttention(base.RandomAttention):
  """FAVOR+ attention with positive orthogonal random features.

  Redraw policy: a feature key is drawn once at init from the 'attention' stream
  of `rngs` (else 'default', else 'params') and stored as uint32 `RandomState`;
  the features are a deterministic function of it and head_dim. With
  `redraw='fixed'` every call uses them. With `redraw='every_call'` each call
  draws fresh features: from the call's `rngs` when given (no module state is
  touched, so it works under plain `jax.jit`), else from the module's stream;
  `deterministic=True` (or `.eval()`) uses the fixed ones.

  Options: `num_features` (m), `kernel` ('softmax' or 'relu'), `redraw`
  ('fixed' or 'every_call'), `chunk_len` (causal chunk) and `block_len`
  (non-causal block), the last two speed/memory trade-offs only.
  """

  def __init__(self, num_features: int = 256, kernel: str = 'softmax',
               redraw: str = 'fixed', chunk_len: int = 64, block_len: int = 256, *,
               rngs: nnx.Rngs):
    base.check_positive_int('num_features', num_features)
    base.check_choice('kernel', kernel, KERNELS)
    base.check_choice('redraw', redraw, REDRAW_POLICIES)
    base.check_positive_int('chunk_len', chunk_len)
    base.check_positive_int('block_len', block_len)
    super().__init__(rngs)
    self.num_features = num_features
    self.kernel = kernel
    self.redraw = redraw
    self.chunk_len = chunk_len
    self.block_len = block_len

  def features(self, head_dim: int, deterministic: bool | None = None,
               rngs=None) -> jax.Array:
    """The random features `[num_features, head_dim]` for a call."""
    key = self.call_key(True if self.redraw == 'fixed' else deterministic, rngs)
    return draw_orthogonal_features(key, self.num_features, head_dim)

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=causal)
    features = self.features(q.shape[-1], deterministic, rngs)
    return favor_attention(q, k, v, features, mask, causal, self.kernel, self.chunk_len,
                           self.block_len)
