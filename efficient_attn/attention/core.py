"""One blocked softmax core: attention by blocks with an online softmax and its own backward.

`attend(q, k, v, q_pos, k_pos, plan)` returns the output and the log-sum-exp of
every query over the keys its `Plan` lets it read and its visibility rule lets
it see. Exact attention, Longformer's band and global tokens and LSH's chunks
are all calls of it; `merge` combines calls over disjoint key sets.

Forward: for each query block a running max, normaliser and output accumulator
are updated key block by key block (Dao 2023, Algorithm 1). Backward:
probabilities are recomputed block by block from q, k and the saved log-sum-exp
(Dao 2023, Algorithm 2), with the cotangent of the log-sum-exp included, so that
merged results differentiate correctly. Memory is linear in the lengths.

Masking: a hidden key's logit is `base.MASK_VALUE`. A row whose largest logit is
at or below `NO_KEY_THRESHOLD` saw no key: its output is exactly 0, its lse is
`NO_KEY_LSE` (finite, so that merging stays NaN-free) and no gradient flows
through it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from efficient_attn.attention import base

# Logit of a query's own key under the `own_key` rule (LSH with shared
# query-keys): below every real logit and above hidden keys, so a query attends
# to itself only when it sees no other key (Kitaev et al. 2020, Section 2,
# "Causal masking for shared-QK attention").
OWN_KEY_VALUE = 0.5 * base.MASK_VALUE
# A row whose largest logit is at or below this saw no key.
NO_KEY_THRESHOLD = 0.75 * base.MASK_VALUE
# The log-sum-exp reported for a row that saw no key.
NO_KEY_LSE = base.MASK_VALUE


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static tiling and visibility rule of one `attend` call.

  Query block i (queries i * q_block ... (i + 1) * q_block - 1) reads
  `kv_steps` key blocks of `kv_block` keys, the first starting at key
  i * kv_stride (kv_stride 0: every query block reads the same keys).

  Key j is visible to query i iff k_pos[j] >= 0 and, with `causal`,
  k_pos[j] <= q_pos[i], and, with `window` w, |q_pos[i] - k_pos[j]| <= w
  (0 <= q_pos[i] - k_pos[j] <= w when causal). With `own_key`, a visible key
  with k_pos[j] == q_pos[i] gets the fixed logit `OWN_KEY_VALUE`. From the
  position ranges of each block pair, key blocks that no query of the block
  sees are skipped and blocks that every query sees in full need no mask;
  `skip_blocks=False` masks every step instead, for positions in no order
  (LSH's sorted chunks), where the ranges would never skip a block.
  """
  q_block: int
  kv_block: int
  kv_steps: int
  kv_stride: int = 0
  causal: bool = False
  window: int | None = None
  own_key: bool = False
  skip_blocks: bool = True


def full_plan(q_len: int, kv_len: int, q_block: int, kv_block: int, causal: bool) -> Plan:
  """Every query block reads every key block (exact attention); blocks shrink for short inputs."""
  q_block = min(q_block, base.round_up(q_len, 8))
  kv_block = min(kv_block, base.round_up(kv_len, 8))
  return Plan(q_block, kv_block, -(-kv_len // kv_block), causal=causal)


def to_rows(x: jax.Array, block: int) -> jax.Array:
  """`[batch, len, heads, d]` -> the core's `[batch, heads, len, d]`, len padded to a multiple of block."""
  return base.pad_axis(x.transpose(0, 2, 1, 3), 2, block)


def key_positions(valid: jax.Array | None, length: int, block: int) -> jax.Array:
  """Int `[batch or 1, len]` key positions, -1 where `valid` is False, padded with -1 to whole blocks."""
  positions = jnp.arange(length)
  if valid is not None:
    positions = jnp.where(valid, positions, -1)
  return base.pad_axis(jnp.atleast_2d(positions), 1, block, -1)


def _visibility(q_pos, k_pos, plan):
  """Bool `[Bp, 1, bq, bk]` visibility and, with `own_key`, which visible keys are own keys."""
  q_pos, k_pos = q_pos[:, None, :, None], k_pos[:, None, None, :]
  visible = k_pos >= 0
  if plan.causal:
    visible &= k_pos <= q_pos
  if plan.window is not None:
    offset = q_pos - k_pos
    visible &= offset <= plan.window
    if not plan.causal:
      visible &= offset >= -plan.window
  own = visible & (k_pos == q_pos) if plan.own_key else None
  return visible, own


def _logits(q, k, q_pos, k_pos, plan, masked):
  """Logits `[B, H, bq, bk]` (float32, masked if `masked`), and the own-key positions (or None)."""
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
  if not masked:
    return s, None
  visible, own = _visibility(q_pos, k_pos, plan)
  s = jnp.where(visible, s, base.MASK_VALUE)
  if own is not None:
    s = jnp.where(own, OWN_KEY_VALUE, s)
  return s, own


def _step_ranges(i, q_pos, k_pos, plan):
  """Which key blocks query block i computes, from position ranges.

  Returns (first, full_first, full_end, end): steps [first, end) hold every key
  the block may see; within them, steps [full_first, full_end) hold only keys
  that every query of the block sees (no mask needed).
  """
  qp = _positions(q_pos, i * plan.q_block, plan.q_block)
  kp = _positions(k_pos, i * plan.kv_stride, plan.kv_steps * plan.kv_block)
  kp = kp.reshape(kp.shape[0], plan.kv_steps, plan.kv_block)
  valid = kp >= 0
  first_key = jnp.where(valid, kp, jnp.iinfo(kp.dtype).max).min((0, 2))
  last_key = kp.max((0, 2))
  first_query, last_query = qp.min(), qp.max()
  seen = last_key >= 0
  full = valid.all((0, 2))
  if plan.causal:
    seen &= first_key <= last_query
    full &= last_key <= first_query
  if plan.window is not None:
    seen &= last_key >= first_query - plan.window
    full &= first_key >= last_query - plan.window
    if not plan.causal:
      seen &= first_key <= last_query + plan.window
      full &= last_key <= first_query + plan.window
  if plan.own_key:
    full &= (last_key < first_query) | (first_key > last_query)
  steps = jnp.arange(plan.kv_steps)
  first = jnp.min(jnp.where(seen, steps, plan.kv_steps))
  end = jnp.maximum(jnp.max(jnp.where(seen, steps + 1, 0)), first)
  full &= (steps >= first) & (steps < end)
  full_first = jnp.min(jnp.where(full, steps, end))
  full_end = jnp.min(jnp.where(~full & (steps > full_first), steps, end))
  return first, full_first, full_end, end


def _loop(i, q_pos, k_pos, plan, step, init):
  """Runs `step(t, carry, masked)` over the key blocks query block i computes."""
  if not plan.skip_blocks:
    return jax.lax.fori_loop(0, plan.kv_steps, functools.partial(step, masked=True), init)
  first, full_first, full_end, end = _step_ranges(i, q_pos, k_pos, plan)
  masked = functools.partial(step, masked=True)
  carry = jax.lax.fori_loop(first, full_first, masked, init)
  carry = jax.lax.fori_loop(full_first, full_end, functools.partial(step, masked=False), carry)
  return jax.lax.fori_loop(full_end, end, masked, carry)


def _rows(x, start, size):
  """`x[..., start:start + size, :]` of a `[..., len, d]` array."""
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 2)


def _positions(pos, start, size):
  """`pos[:, start:start + size]`."""
  return jax.lax.dynamic_slice_in_dim(pos, start, size, axis=1)


def _key_start(i, t, plan):
  """First key of step t of query block i."""
  return i * plan.kv_stride + t * plan.kv_block


def _forward(q, k, v, q_pos, k_pos, plan):
  """Outputs `[B, H, Lq, dv]` (dtype of q) and lse `[B, H, Lq]` (float32)."""
  bq, bk = plan.q_block, plan.kv_block
  batch, heads, q_len, _ = q.shape
  dv = v.shape[-1]

  def one_query_block(i):
    qi, qp = _rows(q, i * bq, bq), _positions(q_pos, i * bq, bq)

    def step(t, carry, masked):
      m, l, acc = carry
      start = _key_start(i, t, plan)
      s, _ = _logits(qi, _rows(k, start, bk), qp, _positions(k_pos, start, bk), plan, masked)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      pv = jnp.einsum('bhqk,bhkd->bhqd', p.astype(v.dtype), _rows(v, start, bk),
                      preferred_element_type=jnp.float32)
      return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv

    shape = (batch, heads, bq)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (dv,), jnp.float32))
    m, l, acc = _loop(i, q_pos, k_pos, plan, step, init)
    seen = m > NO_KEY_THRESHOLD
    l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen[..., None], acc / l[..., None], 0.0).astype(q.dtype)
    return out, jnp.where(seen, m + jnp.log(l), NO_KEY_LSE)

  out, lse = jax.lax.map(one_query_block, jnp.arange(q_len // bq))
  # [nq, B, H, bq, ...] -> [B, H, nq * bq, ...]
  out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, q_len, dv)
  return out, jnp.moveaxis(lse, 0, 2).reshape(batch, heads, q_len)


def _backward(q, k, v, q_pos, k_pos, out, lse, dout, dlse, plan):
  """Gradients w.r.t. q, k, v, one query block at a time (Dao 2023, Algorithm 2)."""
  bq, bk = plan.q_block, plan.kv_block
  # ds = p * (dp - delta) with delta = rowsum(dO * O) - dlse (Dao 2023,
  # Algorithm 2, line 4, plus the lse cotangent, as d lse / d logits = p).
  # (An einsum: XLA:CPU's multiply-then-sum is 15-30x slower with a size-1 axis.)
  delta = jnp.einsum('bhqd,bhqd->bhq', dout, out, preferred_element_type=jnp.float32) - dlse
  # +inf makes the recomputed probabilities of rows that saw no key exactly 0.
  lse = jnp.where(lse > NO_KEY_THRESHOLD, lse, jnp.inf)

  def one_query_block(carry, i):
    dk, dv = carry
    qi, qp, doi = _rows(q, i * bq, bq), _positions(q_pos, i * bq, bq), _rows(dout, i * bq, bq)
    lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=2)[..., None]
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=2)[..., None]

    def step(t, carry, masked):
      dq_i, dk, dv = carry
      start = _key_start(i, t, plan)
      kj, vj = _rows(k, start, bk), _rows(v, start, bk)
      s, own = _logits(qi, kj, qp, _positions(k_pos, start, bk), plan, masked)
      p = jnp.exp(s - lse_i)
      dv_j = jnp.einsum('bhqk,bhqd->bhkd', p.astype(doi.dtype), doi,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum('bhqd,bhkd->bhqk', doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i)
      if own is not None:
        ds = jnp.where(own, 0.0, ds)  # the own-key logit is a constant
      ds = ds.astype(q.dtype)
      dq_i = dq_i + jnp.einsum('bhqk,bhkd->bhqd', ds, kj, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum('bhqk,bhqd->bhkd', ds, qi, preferred_element_type=jnp.float32)
      return dq_i, _add_rows(dk, start, dk_j), _add_rows(dv, start, dv_j)

    dq_i = jnp.zeros(qi.shape, jnp.float32)
    dq_i, dk, dv = _loop(i, q_pos, k_pos, plan, step, (dq_i, dk, dv))
    return (dk, dv), dq_i.astype(q.dtype)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(one_query_block, (zeros(k), zeros(v)),
                              jnp.arange(q.shape[2] // bq))
  dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


def _add_rows(x, start, rows):
  """`x` with `rows` added to `x[..., start:start + len(rows), :]`."""
  current = _rows(x, start, rows.shape[-2])
  return jax.lax.dynamic_update_slice_in_dim(x, current + rows, start, axis=x.ndim - 2)


# On CPU, the most bytes of float32 scores one block step holds: a step takes
# as many of the B x H rows as fit, so that its scores stay in cache (measured
# in experiments/results/blocked_tuning.md). Accelerators take all rows.
_CPU_STEP_BYTES = 1 << 20


def _largest_divisor(n: int, at_most: int) -> int:
  """The largest divisor of n that is at most `at_most` (and at least 1)."""
  return max(d for d in range(1, n + 1) if n % d == 0 and (d <= at_most or d == 1))


def rows_per_step(batch: int, heads: int, plan: Plan) -> tuple[int, int]:
  """(batch rows, heads) one block step computes together, decided for the current backend."""
  if jax.default_backend() != 'cpu':
    return batch, heads
  fit = _CPU_STEP_BYTES // (4 * plan.q_block * plan.kv_block)
  group = _largest_divisor(heads, fit)
  return _largest_divisor(batch, fit // group), group


def _in_groups(fn, group, arrays, axis):
  """`fn` over groups of `group` entries of `axis` of every array, one group after another."""
  size = arrays[0].shape[axis]
  if group == size:
    return fn(*arrays)
  split = lambda x: jnp.moveaxis(
      x.reshape(x.shape[:axis] + (size // group, group) + x.shape[axis + 1:]), axis, 0)
  outputs = jax.lax.map(lambda x: fn(*x), tuple(split(x) for x in arrays))
  join = lambda x: jnp.moveaxis(x, 0, axis).reshape(x.shape[1:axis + 1] + (size,) + x.shape[axis + 2:])
  return jax.tree.map(join, outputs)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
           plan: Plan) -> tuple[jax.Array, jax.Array]:
  """Blocked softmax attention of each query over the keys its plan and rule allow.

  Args:
    q: pre-scaled queries `[B, H, Lq, d]`, Lq a multiple of `plan.q_block`.
    k: keys `[B, H, Lk, d]`, long enough for every key block the plan reads.
    v: values `[B, H, Lk, dv]`.
    q_pos: int `[B or 1, Lq]`, query positions, shared by the H rows.
    k_pos: int `[B or 1, Lk]`, key positions, negative for keys never visible
      (padding).
    plan: static tiling and visibility rule.

  Returns:
    out `[B, H, Lq, dv]` in the dtype of q (zeros for rows that see no key) and
    lse float32 `[B, H, Lq]` (`NO_KEY_LSE` for those rows).
  """
  batch, heads = q.shape[:2]
  batch_group, head_group = rows_per_step(batch, heads, plan)

  def over_heads(q, k, v, q_pos, k_pos):
    return _in_groups(lambda q, k, v: _attend(q, k, v, q_pos, k_pos, plan), head_group,
                      (q, k, v), axis=1)

  if batch_group == batch:
    return over_heads(q, k, v, q_pos, k_pos)
  q_pos = jnp.broadcast_to(q_pos, (batch, q_pos.shape[1]))
  k_pos = jnp.broadcast_to(k_pos, (batch, k_pos.shape[1]))
  return _in_groups(over_heads, batch_group, (q, k, v, q_pos, k_pos), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, q_pos, k_pos, plan):
  return _forward(q, k, v, q_pos, k_pos, plan)


def _attend_fwd(q, k, v, q_pos, k_pos, plan):
  out, lse = _forward(q, k, v, q_pos, k_pos, plan)
  return (out, lse), (q, k, v, q_pos, k_pos, out, lse)


def _attend_bwd(plan, residuals, cotangents):
  q, k, v, q_pos, k_pos, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv = _backward(q, k, v, q_pos, k_pos, out, lse, dout, dlse, plan)
  return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def merge(parts):
  """Combines `(out, lse)` results over disjoint key sets into one, by log-sum-exp.

  Args:
    parts: sequence of (out `[..., L, dv]`, lse `[..., L]`) pairs, as `attend`
      returns them.

  Returns:
    (out, lse) of attention over the union of the parts' keys; out in the dtype
    of the first part, zeros and `NO_KEY_LSE` where no part saw a key.
  """
  lse = jnp.stack([part[1] for part in parts])
  # The max only stabilises exp(); it cancels in the result.
  top = jax.lax.stop_gradient(lse.max(0))
  weights = jnp.exp(lse - top)
  total = weights.sum(0)
  out = sum(w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, parts))
  out = (out / total[..., None]).astype(parts[0][0].dtype)
  # Where no part saw a key, top + log(parts) rounds back to NO_KEY_LSE.
  return out, top + jnp.log(total)
