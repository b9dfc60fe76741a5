"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): features elu + 1.

Attention weights are phi(q_i).phi(k_j) with phi(x) = elu(x) + 1 (Section 3.2,
Eq. 7), normalised over the keys, so the output D^-1 phi(Q) (phi(K)^T V) costs
O(length * head_dim * value_dim) time and no `[q_len, kv_len]` array. Causal
attention (Section 3.3) is the same sum over keys j <= i, computed by prefix
sums of phi(k_j) v_j^T and phi(k_j). Both are `kernelized.feature_attention`,
which Performer also uses: blocks of keys (non-causal) or chunks with a scan
(causal), recomputed in the backward pass.

Where this differs from the paper and the public LRA code
(`lra_benchmarks/models/linear_transformer`):
- Padding keys get zero features, so they enter neither sum, and causal
  attention is supported; the LRA code ignores its padding and causal masks.
- No eps in the normaliser (the LRA code adds 1e-6): elu + 1 > 0, so
  the normaliser of a query that sees a key is positive; a query that sees no
  key returns zeros instead of 0 / eps.
- Features are computed in float32 and cast to the input dtype; the sums and
  the normaliser are float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base, kernelized


def elu_features(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """The feature map phi(x) = elu(x) + 1 (Eq. 7), zero where `valid` is False.

  Args:
    x: queries or keys `[..., head_dim]`.
    valid: None or bool broadcastable to `x`.

  Returns:
    Positive features, the shape and dtype of `x` (computed in float32).
  """
  phi = jax.nn.elu(x.astype(jnp.float32)) + 1.0
  if valid is not None:
    phi = jnp.where(valid, phi, 0.0)
  return phi.astype(x.dtype)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                     causal: bool = False, chunk_len: int = 64, block_len: int = 256,
                     chunks_per_step: int = 8) -> jax.Array:
  """Linear attention D^-1 phi(Q) (phi(K)^T V) with phi = elu + 1.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    mask: None or bool `[batch, kv_len]`, True for real keys.
    causal: query i sees keys j <= i only (needs q_len == kv_len).
    chunk_len: chunk length of the causal prefix sums.
    block_len: positions per block in non-causal attention.
    chunks_per_step: chunks per step of the causal scan.

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries with
    no visible key.
  """
  return kernelized.feature_attention(q, k, v, elu_features, elu_features, q.shape[-1], mask,
                                      causal, chunk_len, block_len, chunks_per_step)


@base.register_attention('linear')
class LinearAttention(base.Attention):
  """Linear attention with the elu + 1 feature map; no parameters, no randomness.

  Options: `chunk_len` (causal chunk), `block_len` (non-causal block) and
  `chunks_per_step` (causal chunks computed together), all speed/memory
  trade-offs only: the result does not depend on them beyond rounding.
  """

  def __init__(self, chunk_len: int = 64, block_len: int = 256, chunks_per_step: int = 8, *,
               rngs: nnx.Rngs | None = None):
    base.check_positive_int('chunk_len', chunk_len)
    base.check_positive_int('block_len', block_len)
    base.check_positive_int('chunks_per_step', chunks_per_step)
    self.chunk_len = chunk_len
    self.block_len = block_len
    self.chunks_per_step = chunks_per_step

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=causal)
    return linear_attention(q, k, v, mask, causal, self.chunk_len, self.block_len,
                            self.chunks_per_step)
