"""Synthesizer attention (Tay et al. 2021, "Rethinking Self-Attention"): synthetic logits.

The attention logits are not q.k dot products but synthesized (Section 3):
- Dense (Section 3.1): each query position's logits over the key positions come
  from its own vector alone, F(x) = W2 relu(W1 x + b1) + b2 with W1 `[d, d]`
  and W2 `[d, max_len]`. Here x is the per-head query vector (width head_dim),
  so q plays the role of the paper's X projected per head.
- Factorized dense: F_A(x) gives `rank` logits and F_B(x) gives
  ceil(max_len / rank); the logit of key j is A[j mod rank] * B[j div rank]
  (the paper's tiling functions H_A and H_B). The two share the hidden layer
  relu(W1 x + b1) and differ in the output projection.
- Random (Section 3.2): a learned `[max_len, max_len]` matrix R per head,
  independent of the tokens. Factorized random: R = R1 R2 with R1
  `[max_len, rank]` and R2 `[rank, max_len]`.
The logits are sliced to `[q_len, kv_len]`, padding keys (and future keys when
causal) are hidden, and the softmax weights multiply v. Keys are not used
(`uses_keys = False`), so `MultiHeadAttention` builds no key projection.

The Synthesizer is O(n^2) in time by nature (every query has a logit for every
key), and `max_len` (a required option) bounds the lengths, as the learned
weights have one row or column per position. Two variants are low-rank, their
logits dot products of per-position vectors: dense ([relu(W1 x + b1), 1] .
[W2_j, b2_j]) and factorized random (R1_i . R2_j). They run through
`blocked_attention` with those vectors as queries and keys, so their memory is
linear in length. Random and factorized dense materialise the `[q_len,
kv_len]` weights (O(n^2) memory).

Where this differs from the public LRA code (`lra_benchmarks/models/synthesizer`):
- Dense logits come from the per-head query vectors, not from the layer input;
  LRA's dense branch reshapes `[batch, len, heads, max_len]` to `[batch, heads,
  len, max_len]` without a transpose, which mixes positions and heads.
- LRA has no factorized dense variant; its default, factorized random with
  rank 32, is the default here too.
- With `num_heads=None` one set of weights serves every head (LRA: one per head).
- Queries that see no key (all padding, or causal before the first real key)
  return zeros.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base
from efficient_attn.attention.blocked import blocked_attention

VARIANTS = ('dense', 'random')

# Lecun normal over each head's matrix `[fan_in, fan_out]`, as LRA initialises
# its synthetic weights (fan_in the second-to-last axis).
_init_weight = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


def _hidden(q: jax.Array, params: dict) -> jax.Array:
  """relu(W1 x + b1) of every per-head query vector x: `[batch, heads, q_len, head_dim]`."""
  x = q.transpose(0, 2, 1, 3)
  hidden = jnp.einsum('bhid,hde->bhie', x, params['w1'].astype(q.dtype))
  return jax.nn.relu(hidden + params['b1'][:, None].astype(q.dtype))


def is_low_rank(variant: str, factorized: bool) -> bool:
  """Whether the logits of a variant are dot products (dense, factorized random)."""
  return (variant == 'dense') != factorized


def logit_queries_and_keys(q: jax.Array, params: dict, variant: str,
                           kv_len: int) -> tuple[jax.Array, jax.Array]:
  """Queries and keys whose dot products are the logits of a low-rank variant.

  Dense: [relu(W1 x + b1), 1] . [W2 column j, b2_j]; factorized random: row i
  of R1 . column j of R2.

  Args:
    q: queries `[batch, q_len, heads, head_dim]`.
    params: the weights, named as `SynthesizerAttention`'s parameters, each with
      a leading head axis (of size 1 when shared by all heads).
    variant: 'dense' (plain) or 'random' (factorized).
    kv_len: number of keys.

  Returns:
    (queries `[batch, q_len, heads, width]`, keys `[batch, kv_len, heads,
    width]`) in the dtype of q.
  """
  batch, q_len, heads = q.shape[:3]
  if variant == 'random':
    queries = params['random_1'][:, :q_len][None]
    keys = params['random_2'][:, :, :kv_len].swapaxes(1, 2)
  else:
    hidden = _hidden(q, params)
    queries = jnp.concatenate([hidden, jnp.ones(hidden.shape[:-1] + (1,), q.dtype)], axis=-1)
    keys = jnp.concatenate([params['w2'][:, :, :kv_len].swapaxes(1, 2),
                            params['b2'][:, :kv_len, None]], axis=-1)
  queries = jnp.broadcast_to(queries, (batch, heads) + queries.shape[2:])
  keys = jnp.broadcast_to(keys, (batch, heads) + keys.shape[1:])
  return queries.swapaxes(1, 2).astype(q.dtype), keys.swapaxes(1, 2).astype(q.dtype)


def synthetic_logits(q: jax.Array, params: dict, variant: str, kv_len: int) -> jax.Array:
  """The logits of a variant that is not low-rank (random, factorized dense), float32.

  Args:
    q: queries `[batch, q_len, heads, head_dim]`.
    params: the weights, as for `logit_queries_and_keys`.
    variant: 'random' (plain) or 'dense' (factorized).
    kv_len: number of keys.

  Returns:
    float32 logits `[batch or 1, heads or 1, q_len, kv_len]` of query i over key j.
  """
  if variant == 'random':
    return params['random'][None, :, :q.shape[1], :kv_len].astype(jnp.float32)
  hidden = _hidden(q, params)

  def project(name):
    out = jnp.einsum('bhie,hel->bhil', hidden, params[f'w2_{name}'].astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out + params[f'b2_{name}'][:, None]

  a, b = project('a'), project('b')
  # H_A tiles A across the key positions, H_B repeats each entry of B `rank` times.
  logits = jnp.tile(a, b.shape[-1]) * jnp.repeat(b, a.shape[-1], axis=-1)
  return logits[..., :kv_len]


def synthesizer_attention(q: jax.Array, k: jax.Array, v: jax.Array, params: dict,
                          mask: jax.Array | None = None, causal: bool = False,
                          variant: str = 'random', factorized: bool = True) -> jax.Array:
  """softmax(synthetic logits, masked) v; `k` is not read (only its length).

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`, unused but for its shape.
    v: `[batch, kv_len, heads, value_dim]`.
    params: the weights, as for `logit_queries_and_keys`; their `max_len` must
      cover kv_len (and q_len for the random variants).
    mask: None or bool `[batch, kv_len]`, True for real keys.
    causal: query i sees keys j <= i only (needs q_len == kv_len).
    variant: 'dense' or 'random'.
    factorized: the factorized form of the variant.

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries
    with no visible key.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  check_lengths(q_len, kv_len, max_length(params, variant, factorized), variant)
  if is_low_rank(variant, factorized):
    queries, keys = logit_queries_and_keys(q, params, variant, kv_len)
    return blocked_attention(queries, keys, v, mask, causal, scale=1.0)
  logits = synthetic_logits(q, params, variant, kv_len)
  visible = jnp.ones((1, 1, 1, kv_len), bool)
  if mask is not None:
    visible = mask[:, None, None, :]
  if causal:
    visible = visible & jnp.tril(jnp.ones((q_len, kv_len), bool))
  logits = jnp.where(visible, logits, base.MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1)
  # A row that sees no key has uniform weights over hidden keys: zero them.
  weights = jnp.where(visible.any(-1, keepdims=True), weights, 0.0)
  out = jnp.einsum('bhij,bjhd->bihd', weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def max_length(params: dict, variant: str, factorized: bool) -> int:
  """The longest key length the weights in `params` cover."""
  if variant == 'random':
    return params['random_2' if factorized else 'random'].shape[-1]
  if factorized:
    return params['w2_a'].shape[-1] * params['w2_b'].shape[-1]
  return params['w2'].shape[-1]


def check_lengths(q_len: int, kv_len: int, max_len: int, variant: str) -> None:
  """Raises ValueError if the logits of `variant` do not cover kv_len (and q_len for 'random')."""
  lengths = {'kv_len': kv_len, **({'q_len': q_len} if variant == 'random' else {})}
  for name, length in lengths.items():
    if length > max_len:
      raise ValueError(
          f'{name}={length} exceeds max_len={max_len}: the synthesizer has learned logits for '
          f'{max_len} positions only; build it with max_len >= {length}')


@base.register_attention('synthesizer')
class SynthesizerAttention(base.Attention):
  """Synthesizer attention with learned dense or random synthetic logits.

  Options: `max_len` (required) is the longest input the learned logits cover;
  `variant` 'dense' (logits from each query vector) or 'random' (learned
  logits, independent of the tokens); `factorized` the low-rank forms with
  `rank` (factorized random: R = R1 R2 of rank `rank`; factorized dense:
  `rank` tiled logits times ceil(max_len / rank) repeated ones); `num_heads`
  one set of weights per head (None: shared by all heads); `head_dim` the
  query width, required by the dense variant.
  """

  uses_keys = False

  def __init__(self, max_len: int | None = None, variant: str = 'random',
               factorized: bool = True, rank: int = 32, num_heads: int | None = None,
               head_dim: int | None = None, *, rngs: nnx.Rngs):
    if max_len is None:
      raise ValueError(
          'synthesizer needs max_len, the longest input length: its learned logits have one '
          'entry per position, e.g. make_attention("synthesizer", max_len=1024, ...)')
    base.check_positive_int('max_len', max_len)
    base.check_choice('variant', variant, VARIANTS)
    base.check_choice('factorized', factorized, (False, True))
    base.check_positive_int('rank', rank)
    if num_heads is not None:
      base.check_positive_int('num_heads', num_heads)
    if variant == 'dense':
      if head_dim is None:
        raise ValueError("variant='dense' needs head_dim, the width of each head's queries")
      base.check_positive_int('head_dim', head_dim)
    self.max_len = max_len
    self.variant = variant
    self.factorized = factorized
    self.num_heads = num_heads
    self.head_dim = head_dim
    heads = num_heads or 1
    key = rngs.params
    if variant == 'random':
      if factorized:
        self.random_1 = nnx.Param(_init_weight(key(), (heads, max_len, rank)))
        self.random_2 = nnx.Param(_init_weight(key(), (heads, rank, max_len)))
      else:
        self.random = nnx.Param(_init_weight(key(), (heads, max_len, max_len)))
      return
    self.w1 = nnx.Param(_init_weight(key(), (heads, head_dim, head_dim)))
    self.b1 = nnx.Param(jnp.zeros((heads, head_dim)))
    outputs = {'_a': rank, '_b': -(-max_len // rank)} if factorized else {'': max_len}
    for name, width in outputs.items():
      setattr(self, f'w2{name}', nnx.Param(_init_weight(key(), (heads, head_dim, width))))
      setattr(self, f'b2{name}', nnx.Param(jnp.zeros((heads, width))))

  def params(self) -> dict:
    """The weights as plain arrays, named as `synthetic_logits` expects."""
    return {name: value[...] for name, value in vars(self).items()
            if isinstance(value, nnx.Param)}

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=causal)
    if self.num_heads is not None and q.shape[2] != self.num_heads:
      raise ValueError(f'num_heads={self.num_heads} but the inputs have {q.shape[2]} heads')
    if self.head_dim is not None and q.shape[3] != self.head_dim:
      raise ValueError(f'head_dim={self.head_dim} but the inputs have head_dim {q.shape[3]}')
    check_lengths(q.shape[1], k.shape[1], self.max_len, self.variant)
    return synthesizer_attention(q, k, v, self.params(), mask, causal, self.variant,
                                 self.factorized)
