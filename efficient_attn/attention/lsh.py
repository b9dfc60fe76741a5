"""LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer").

Each hash round puts every token into a bucket by angular LSH (Section 2,
"Locality sensitive hashing"; random rotations drawn per head and round), sorts
the tokens by (bucket, position), cuts the sorted sequence into chunks and lets
each chunk of queries attend to its own chunk of keys and the chunk before it
(Section 2, "LSH attention"; Figure 2 shows this look-back). This is also the
default of trax's `LSHSelfAttention` (`n_chunks_before=1, n_chunks_after=0`)
and of reformer-pytorch; `n_chunks_after=1` adds the chunk after it, which the
paper does not describe. Causal attention never looks forward.
Rounds are combined with weights softmax over their log-sum-exps (Section 2,
"Multi-round LSH attention"), as trax's `LSHSelfAttention` does. Choices,
following trax's `LSHSelfAttention`:
- keys in the attended chunks are not masked by bucket equality;
- a query-key pair found by several rounds is counted once per round
  (duplicates are not removed);
- padding keys get an extra bucket of their own, so they sort to the end and
  never change where real tokens land;
- more than 128 buckets are hashed as two factors (see `bucket_factors`).
Where this differs from trax: logits are scaled by 1/sqrt(head_dim) also with
shared query-keys (trax's unit keys make it q . k / |k| with no scale), and
chunks of equal length are used when the length is not a multiple of
`chunk_len` (ceil(length / chunk_len) chunks of at most `chunk_len` tokens).
Without shared query-keys, queries and keys are hashed with the same rotations
and sorted separately; query chunk i meets key chunk i and its neighbours.
With q_len == kv_len this is self-attention: the mask marks padded queries too,
which sort last like padding keys, so real queries meet real keys chunk by chunk
(outputs at padded positions are not meaningful). With q_len != kv_len
(cross-attention) the mask covers keys only: all queries are real, and the real
keys are spread evenly over the key chunks in sorted order, so that query chunk
i meets the same fraction of the sorted real keys as of the sorted queries.

The chunks attend through the shared blocked-softmax core (`core.attend`, one
call for all rounds; a token's own key under shared query-keys is the core's
`own_key` rule), and rounds are combined by `core.merge`.
Memory is O(length * chunk_len * n_hashes) in the forward and backward pass;
permutations are gathers whose gradients are gathers by the inverse
permutation. Hashing costs O(length * head_dim * sqrt(n_buckets)) with
factorised buckets (O(length * head_dim * n_buckets) up to 128 buckets); its
memory stays linear (rows are hashed in blocks).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.attention import base, core

# Largest int32, the largest key of the one-array sort in `sort_by_bucket`.
_MAX_SORT_KEY = 2**31 - 1
# Above this many buckets, hashing uses two factors (trax's rule).
_MAX_UNFACTORED_BUCKETS = 128
# Most rotated-vector entries that hashing holds at once.
_HASH_BLOCK_SIZE = 1 << 25


def num_chunks(q_len: int, kv_len: int, chunk_len: int) -> int:
  """Number of chunks the sorted queries and keys are cut into."""
  return max(-(-q_len // chunk_len), -(-kv_len // chunk_len))


def check_n_chunks_after(n_chunks_after) -> None:
  """Raises ValueError unless n_chunks_after is the int 0 or 1."""
  if type(n_chunks_after) is not int or n_chunks_after not in (0, 1):
    raise ValueError(f'n_chunks_after must be 0 or 1, got {n_chunks_after!r}')


def default_n_buckets(length: int, chunk_len: int) -> int:
  """The default number of buckets: two per chunk, 2 * ceil(length / chunk_len).

  Buckets then hold chunk_len / 2 tokens on average, as in the paper and trax.
  """
  return 2 * num_chunks(length, length, chunk_len)


def bucket_factors(n_buckets: int) -> tuple[int, ...]:
  """The bucket counts of the hash factors: `(n_buckets,)` up to 128 buckets.

  Above 128, two even factors as trax's `LSHSelfAttention` picks them: the power
  of two at or above sqrt(n_buckets), and 2 * (n_buckets // (2 * that)). Their
  product (the bucket count used) can be below n_buckets when n_buckets is not
  a power of two.
  """
  if n_buckets <= _MAX_UNFACTORED_BUCKETS:
    return (n_buckets,)
  first = 2**math.ceil(math.log2(math.sqrt(n_buckets)))
  return (first, 2 * (n_buckets // (2 * first)))


def draw_rotations(key: jax.Array, heads: int, n_hashes: int, head_dim: int,
                   n_buckets: int) -> jax.Array | tuple[jax.Array, ...]:
  """Gaussian random rotations for `hash_buckets` (float32).

  Args:
    key: a PRNG key.
    heads: number of heads.
    n_hashes: number of hash rounds.
    head_dim: size of the hashed vectors.
    n_buckets: 1 (no hashing) or an even bucket count, factorised by
      `bucket_factors`.

  Returns:
    `[heads, n_hashes, head_dim, n_buckets // 2]`, or above 128 buckets a tuple
    with one such array per factor (the factor's bucket count in place of
    n_buckets).
  """
  factors = bucket_factors(n_buckets)
  halves = [factor // 2 for factor in factors]
  rotations = jax.random.normal(key, (heads, n_hashes, head_dim, sum(halves)), jnp.float32)
  if len(factors) == 1:
    return rotations
  return tuple(jnp.split(rotations, [halves[0]], axis=-1))


def _factor_rotations(rotations) -> tuple[jax.Array, ...]:
  """The rotations of each hash factor, as a tuple."""
  return tuple(rotations) if isinstance(rotations, (tuple, list)) else (rotations,)


def _argmax_of_both_signs(x: jax.Array) -> jax.Array:
  """argmax([x; -x]) along the last axis, ties to the first index, as jnp.argmax.

  From the max and min and the first index holding the winner: XLA on CPU runs
  this 2-3x faster than argmax or two top-1 searches.
  """
  high = jnp.max(x, axis=-1, keepdims=True)
  low = jnp.min(x, axis=-1, keepdims=True)
  positive = high >= -low
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == jnp.where(positive, high, low), index, x.shape[-1]), axis=-1)
  return first + jnp.where(positive[..., 0], 0, x.shape[-1])


def hash_buckets(x: jax.Array, rotations) -> jax.Array:
  """Angular LSH buckets `[batch, heads, n_hashes, length]` of x `[batch, heads, length, dim]`.

  bucket = argmax([xR; -xR]) (Section 2, after Andoni et al. 2015); with
  `rotations.shape[-1] == 0` every token is in bucket 0 (a single bucket). With a
  tuple of rotations (factors of sizes n_0, n_1, ...; see `draw_rotations`),
  bucket = b_0 + n_0 * b_1 + n_0 * n_1 * b_2 ... with b_i hashed by factor i.
  """
  batch, heads, length, dim = x.shape
  factors = _factor_rotations(rotations)
  n_hashes = factors[0].shape[1]
  halves = [r.shape[-1] for r in factors]
  total = sum(halves)
  if total == 0:
    return jnp.zeros((batch, heads, n_hashes, length), jnp.int32)
  # Heads lead both operands, so that the matmul runs per head without copies.
  x = x.astype(jnp.float32).transpose(1, 0, 2, 3).reshape(heads, batch * length, dim)
  rotations = jnp.concatenate(factors, axis=-1)
  rotations = rotations.transpose(0, 2, 1, 3).reshape(heads, dim, n_hashes * total)

  def buckets_of(rows):
    rotated = jnp.einsum('hnd,hdk->hnk', rows, rotations)
    rotated = rotated.reshape(rows.shape[:2] + (n_hashes, total))
    buckets, stride, start = 0, 1, 0
    for half in halves:
      buckets = buckets + stride * _argmax_of_both_signs(rotated[..., start:start + half])
      start += half
      stride *= 2 * half
    return buckets

  # The rotated vectors grow as length * n_buckets: in blocks of rows when large.
  block = max(1, _HASH_BLOCK_SIZE // (heads * n_hashes * total))
  if batch * length <= block:
    buckets = buckets_of(x)
  else:
    blocks = -(-batch * length // block)
    x = base.pad_axis(x, 1, block).reshape(heads, blocks, block, dim).transpose(1, 0, 2, 3)
    buckets = jax.lax.map(buckets_of, x).transpose(1, 0, 2, 3).reshape(heads, -1, n_hashes)
    buckets = buckets[:, :batch * length]
  return buckets.reshape(heads, batch, length, n_hashes).transpose(1, 0, 3, 2)


def sort_by_bucket(buckets: jax.Array, n_buckets: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stable sort of each round by bucket, i.e. by (bucket, position).

  Args:
    buckets: int `[..., length]`, each in [0, n_buckets].
    n_buckets: the largest bucket.

  Returns:
    (order, inverse, sorted_buckets): `order[i]` is the position of the i-th
    sorted token, `inverse` undoes the sort, `sorted_buckets = buckets[order]`.
  """
  length = buckets.shape[-1]
  positions = _positions(buckets.shape)
  if (n_buckets + 1) * length - 1 <= _MAX_SORT_KEY:
    # One int key bucket * length + position: XLA on CPU sorts a single array
    # of numbers more than 10x faster than a key with a payload.
    keys = jax.lax.sort(buckets * length + positions, dimension=-1)
    order, sorted_buckets = keys % length, keys // length
  else:
    sorted_buckets, order = jax.lax.sort((buckets, positions), dimension=-1,
                                         is_stable=True, num_keys=1)
  return order, _inverse(order), sorted_buckets


def _positions(shape) -> jax.Array:
  """0, 1, ... along the last axis of `shape` (int32)."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)


def _inverse(order: jax.Array) -> jax.Array:
  """The inverse of permutations `order` along the last axis, by a scatter."""
  rows = tuple(i[..., None] for i in jnp.indices(order.shape[:-1], sparse=True))
  return jnp.zeros_like(order).at[rows + (order,)].set(_positions(order.shape),
                                                       unique_indices=True)


def _spread_valid(order: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Interleaves sorted valid and invalid tokens evenly, each keeping its order.

  Args:
    order: int `[..., n]` a sort whose valid tokens come first.
    valid: bool `[..., n]` validity in sorted order (True first).

  Returns:
    (order, valid) rearranged so that the k-th of m valid tokens sits near
    position n * (k + 1/2) / m, and likewise the invalid ones.
  """
  n = order.shape[-1]
  count = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.int32)
  rank = _positions(order.shape)
  rank_among = jnp.where(valid, rank, rank - count).astype(jnp.float32)
  among = jnp.where(valid, count, n - count).astype(jnp.float32)
  quantile = (rank_among + 0.5) / jnp.maximum(among, 1.0)
  _, order, valid = jax.lax.sort((quantile, order, valid), dimension=-1, is_stable=True,
                                 num_keys=1)
  return order, valid


def _take_rows_impl(x, order):
  """`x[b, r, order[b, r, i]]` for x `[B, R, n, d]` (R = 1 or rounds), order `[B, rounds, m]`."""
  batch, rounds, m = order.shape
  n, dim = x.shape[2], x.shape[3]
  first_row = jnp.arange(batch, dtype=jnp.int32)[:, None, None] * (x.shape[1] * n)
  if x.shape[1] != 1:
    first_row = first_row + jnp.arange(rounds, dtype=jnp.int32)[None, :, None] * n
  rows = jnp.take(x.reshape(-1, dim), (first_row + order).reshape(-1), axis=0, mode='clip')
  return rows.reshape(batch, rounds, m, dim)


@jax.custom_vjp
def _take_rows(x, order, inverse):
  """Permutes rows of x by `order` (see `_take_rows_impl`); `inverse` undoes `order`.

  Autodiff of a gather scatters; a permutation's gradient is the gather by the
  inverse permutation, which is much cheaper on CPU.
  """
  return _take_rows_impl(x, order)


def _take_rows_fwd(x, order, inverse):
  return _take_rows_impl(x, order), (inverse, x.shape[1])


def _take_rows_bwd(residuals, dy):
  inverse, x_rounds = residuals
  dx = _take_rows_impl(dy, inverse)
  if x_rounds == 1:
    # Summed round by round: elementwise work runs faster than a reduction here.
    rounds = [dx[:, r:r + 1].astype(jnp.float32) for r in range(dx.shape[1])]
    dx = functools.reduce(jnp.add, rounds).astype(dy.dtype)
  return dx, None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _wrap_chunks(x: jax.Array, chunk: int, before: int, after: int, axis: int) -> jax.Array:
  """Sorted tokens along `axis`, the last `before` chunks copied in front, the first `after` behind.

  Query chunk c then finds key chunks c - before ... c + after (wrapping around
  within a round) as consecutive chunks, starting at chunk c.
  """
  length = x.shape[axis]
  parts = [jax.lax.slice_in_dim(x, length - before * chunk, length, axis=axis), x,
           jax.lax.slice_in_dim(x, 0, after * chunk, axis=axis)]
  return jnp.concatenate(parts, axis=axis)


def lsh_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  rotations: jax.Array | tuple[jax.Array, ...],
                  mask: jax.Array | None = None, causal: bool = False,
                  chunk_len: int = 128, shared_qk: bool = True,
                  scale: float | None = None, n_chunks_after: int = 0) -> jax.Array:
  """LSH attention (Kitaev et al. 2020) with the given random rotations.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`; ignored when `shared_qk` (the keys
      are then the unit-normalised queries).
    v: `[batch, kv_len, heads, value_dim]`.
    rotations: float32 `[heads, n_hashes, head_dim, n_buckets // 2]`, or a
      tuple of such arrays, one per hash factor; a last dimension of 0 means one
      bucket (no hashing). See `draw_rotations`.
    mask: None or bool `[batch, kv_len]`, True for real keys; with q_len ==
      kv_len (self-attention) also for real queries (see the module docstring).
    causal: query i sees keys j <= i only (needs q_len == kv_len).
    chunk_len: longest chunk of sorted tokens; the sequence is cut into
      ceil(length / chunk_len) chunks of equal length (padded internally).
    shared_qk: keys are the unit-normalised queries and a token attends to
      itself only when it has no other visible key (needs q_len == kv_len).
    scale: logit scale, default 1/sqrt(head_dim).
    n_chunks_after: 0 (look back one chunk, as the paper and trax) or 1 (also
      look forward one chunk); must be 0 when causal.

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries that
    see no key in any hash round.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  base.check_positive_int('chunk_len', chunk_len)
  if (shared_qk or causal) and q_len != kv_len:
    raise ValueError(f'shared_qk and causal LSH attention need q_len == kv_len, '
                     f'got {q_len} and {kv_len}')
  check_n_chunks_after(n_chunks_after)
  if causal and n_chunks_after:
    raise ValueError('causal LSH attention looks back only: n_chunks_after must be 0')
  factors = _factor_rotations(rotations)
  shapes = [getattr(r, 'shape', None) for r in factors]
  if any(shape is None or len(shape) != 4 or (shape[0], shape[2]) != (heads, head_dim)
         or shape[1] != shapes[0][1] or (len(factors) > 1 and shape[3] == 0)
         for shape in shapes):
    raise ValueError(f'rotations must have shape [heads={heads}, n_hashes, '
                     f'head_dim={head_dim}, n_buckets // 2] (or be a tuple of such '
                     f'arrays with equal n_hashes, one per factor), got {shapes}')
  scale = base.default_scale(head_dim) if scale is None else scale
  n_hashes = shapes[0][1]
  n_buckets = math.prod(max(1, 2 * shape[3]) for shape in shapes)
  chunks = num_chunks(q_len, kv_len, chunk_len)
  q_chunk = -(-q_len // chunks)
  kv_chunk = -(-kv_len // chunks)

  def sort_tokens(rows, valid):
    """Sorts rows by bucket, tokens not `valid` `[batch, len]` (and padding) last.

    Returns (order, inverse, validity in sorted order), each
    `[batch * heads, n_hashes, padded_len]`.
    """
    buckets = hash_buckets(rows, rotations)
    valid = base.pad_axis(valid, 1, rows.shape[2], False)
    buckets = jnp.where(valid[:, None, None, :], buckets, n_buckets)
    order, inverse, sorted_buckets = sort_by_bucket(
        buckets.reshape(batch * heads, n_hashes, -1), n_buckets)
    return order, inverse, sorted_buckets < n_buckets

  def flat(rows):
    return rows.reshape((batch * heads, 1) + rows.shape[2:])

  key_valid = base.key_mask_or_ones(mask, batch, kv_len)
  self_attention = q_len == kv_len
  q_rows = core.to_rows(q, q_chunk)
  v_rows = core.to_rows(v.astype(q.dtype), kv_chunk)
  if shared_qk:
    # Keys are the unit-normalised queries: one sort for both, padding keys last.
    q_order, q_inverse, k_valid = sort_tokens(q_rows, key_valid)
    k_order = q_order
    q_sorted, v_sorted = (_take_rows(flat(x), q_order, q_inverse) for x in (q_rows, v_rows))
    norm_sq = jnp.sum(jnp.square(q_sorted.astype(jnp.float32)), axis=-1, keepdims=True)
    k_sorted = (q_sorted * jax.lax.rsqrt(norm_sq + 1e-12)).astype(q.dtype)
  else:
    query_valid = key_valid if self_attention else jnp.ones((batch, q_len), bool)
    q_order, q_inverse, _ = sort_tokens(q_rows, query_valid)
    q_sorted = _take_rows(flat(q_rows), q_order, q_inverse)
    k_rows = core.to_rows(k, kv_chunk)
    k_order, k_inverse, k_valid = sort_tokens(k_rows, key_valid)
    if not self_attention:
      # All queries are real: key chunk i gets the i-th share of the real keys.
      k_order, k_valid = _spread_valid(k_order, k_valid)
      k_inverse = _inverse(k_order)
    k_sorted, v_sorted = (_take_rows(flat(x), k_order, k_inverse) for x in (k_rows, v_rows))

  # The core's batch rows are the sorted rounds (one head each); query chunk c
  # reads key chunks c - 1 ... c + after as one key block (faster than one
  # block per chunk).
  before = int(chunks > 1)
  after = int(n_chunks_after > 0 and chunks > 2)
  plan = core.Plan(q_chunk, (before + 1 + after) * kv_chunk, 1, kv_stride=kv_chunk,
                   causal=causal, own_key=shared_qk, skip_blocks=False)
  keys = lambda x, axis: _wrap_chunks(x, kv_chunk, before, after, axis)
  rounds = lambda x: x.reshape((-1, 1) + x.shape[2:])
  out, lse = core.attend(
      rounds(q_sorted * jnp.asarray(scale, q.dtype)), keys(rounds(k_sorted), 2),
      keys(rounds(v_sorted), 2), q_order.reshape(-1, q_order.shape[-1]),
      keys(jnp.where(k_valid, k_order, -1).reshape(-1, k_order.shape[-1]), 1), plan)
  # Back to the original order (round r's sorted row i is position q_order[i]).
  out, lse = (_take_rows(x.reshape(q_order.shape + (-1,)), q_inverse, q_order)[:, :, :q_len]
              for x in (out, lse[..., None]))
  # Rounds weighted by their share of the softmax mass (Section 2, "Multi-round
  # LSH attention", as trax): a softmax over the rounds' lse.
  out, _ = core.merge([(out[:, r], lse[:, r, :, 0]) for r in range(n_hashes)])
  out = out.reshape(batch, heads, q_len, -1).transpose(0, 2, 1, 3)
  return out.astype(q.dtype)


@base.register_attention('lsh')
class LSHAttention(base.RandomAttention):
  """LSH attention (Reformer); options documented in `lsh_attention`.

  Random rotations (redraw policy): every call draws fresh rotations, from the
  call's `rngs` when given (no module state is touched, so it works under plain
  `jax.jit` / `jax.grad`), else from the module's 'attention' stream (or
  'default', else 'params'); with `deterministic=True` (or after `.eval()`)
  they come from one key drawn at construction and stored as uint32
  `RandomState`, so evaluation is repeatable. All are reproducible from the
  seed.

  Options: `n_hashes` rounds; `n_buckets=None` picks
  `default_n_buckets(length, chunk_len)` per call, `n_buckets=1` means no
  hashing (one bucket), otherwise n_buckets must be even, and above 128 it is
  factorised as trax does (so 200 becomes 16 x 12 = 192); `chunk_len`;
  `shared_qk` (default True: `k` is ignored and the keys are the
  unit-normalised queries); `n_chunks_after` 0 (look back one chunk, the paper
  and trax) or 1 (also look forward one chunk; not with causal). The padding
  mask: in self-attention padded positions sort last as queries and keys; in
  cross-attention every query is real and the real keys are spread over the
  key chunks.
  """

  def __init__(self, n_hashes: int = 2, n_buckets: int | None = None, chunk_len: int = 128,
               shared_qk: bool = True, n_chunks_after: int = 0, *, rngs: nnx.Rngs):
    base.check_positive_int('n_hashes', n_hashes)
    if n_buckets is not None:
      base.check_positive_int('n_buckets', n_buckets)
      if n_buckets != 1 and n_buckets % 2:
        raise ValueError(
            f'n_buckets must be None, 1 (no hashing) or even, got {n_buckets!r}')
    base.check_positive_int('chunk_len', chunk_len)
    base.check_choice('shared_qk', shared_qk, (True, False))
    check_n_chunks_after(n_chunks_after)
    self.n_hashes = n_hashes
    self.n_buckets = n_buckets
    self.chunk_len = chunk_len
    self.shared_qk = shared_qk
    self.n_chunks_after = n_chunks_after
    super().__init__(rngs)
    self.uses_keys = not shared_qk

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask)
    if self.shared_qk and q.shape[1] != k.shape[1]:
      raise ValueError(
          f'shared_qk=True hashes and attends the queries to themselves, so it cannot do '
          f'cross-attention (q_len {q.shape[1]} != kv_len {k.shape[1]}); use shared_qk=False')
    if causal and q.shape[1] != k.shape[1]:
      raise ValueError(
          f'causal=True needs q_len == kv_len, got q_len {q.shape[1]} and kv_len {k.shape[1]}')
    n_buckets = self.n_buckets
    if n_buckets is None:
      n_buckets = default_n_buckets(max(q.shape[1], k.shape[1]), self.chunk_len)
    key = self.call_key(deterministic, rngs)
    rotations = draw_rotations(key, q.shape[2], self.n_hashes, q.shape[3], n_buckets)
    return lsh_attention(q, k, v, rotations, mask, causal, self.chunk_len, self.shared_qk,
                         n_chunks_after=self.n_chunks_after)
