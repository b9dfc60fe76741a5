"""BigBird attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences").

What is computed: the blocked ITC variant (Section 2, "internal transformer
construction", and Appendix D, "Blockified"). The sequence is cut into blocks of
`block_len` tokens. The first `num_global_blocks` blocks are global: their
queries see every key and every query sees their keys. Every other query block
i sees the blocks of its window, i - w ... i + w with w = (num_window_blocks -
1) / 2, the global blocks, and `num_random_blocks` random key blocks drawn for
it, per head (shared by the batch rows, as in LRA), uniformly without
replacement among the non-global blocks outside its window (fewer when there
are fewer such blocks). No key counts twice. With
`causal`, query t sees keys s <= t only: windows look back only, random blocks
are drawn among the earlier non-global blocks outside the window, and global
blocks are seen by the queries after them. Padding keys are never seen.

How it is computed, with no `len x len` array in the forward or backward pass:
the global query blocks attend to every key in one call of the blocked softmax
core (`core.attend`). The other query blocks attend to three disjoint key sets
in three calls, merged by log-sum-exp (`core.merge`): their window, a strip of
consecutive key blocks read in place (global blocks hidden there); the global
blocks, the same for every query block; and their random blocks, gathered per
head. Key positions go with the keys, so that the core applies padding and
causality token by token. Time and memory are O(len * block_len * (global +
window + random blocks)); drawing the random blocks scores (len / block_len)^2
block pairs per head.

Random blocks follow LRA's `get_block_rand_mask` (lra_benchmarks/models/bigbird/
bigbird_attention.py, after the original BigBird code): candidates are the
non-global blocks other than the query block and its two neighbours. Where this
differs from LRA, and why:
- LRA's global blocks are the first and the last; here they are the first
  `num_global_blocks` (default 2, so the same number of global tokens), so
  that they stay global under causal attention (a last global block would be
  seen by no query).
- LRA draws random blocks only within the first 1024 tokens (`last_idx=min(len,
  1024)`), once per layer from a numpy seed; here from the whole sequence
  (the paper's random graph), redrawn every training call (see the module).
- LRA's causal mode falls back to dense O(len^2) attention; here it is blocked.
- LRA masks with -10000 added to logits and zeroes padded queries' outputs;
  here hidden keys get no weight at all and padded queries are left as they
  are (their outputs are not meaningful).
- Lengths that are not a multiple of `block_len` are padded with hidden keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_attn.attention import base, core


def check_options(block_len, num_window_blocks, num_global_blocks, num_random_blocks) -> None:
  """Raises ValueError, naming the argument, unless the block options are valid."""
  base.check_positive_int('block_len', block_len)
  base.check_positive_int('num_window_blocks', num_window_blocks)
  if num_window_blocks % 2 == 0:
    raise ValueError(f'num_window_blocks must be odd (the block and as many neighbours on '
                     f'each side), got {num_window_blocks}')
  base.check_non_negative_int('num_global_blocks', num_global_blocks)
  base.check_non_negative_int('num_random_blocks', num_random_blocks)


def random_candidates(num_blocks: int, num_window_blocks: int, num_global_blocks: int,
                      causal: bool) -> np.ndarray:
  """Bool `[num_blocks - global, num_blocks]`: which key blocks each non-global query block may draw.

  Row i is query block `num_global_blocks + i`; its candidates are the
  non-global blocks outside its window (and, when causal, before it).
  """
  first = min(num_global_blocks, num_blocks)
  query = np.arange(first, num_blocks)[:, None]
  key = np.arange(num_blocks)[None, :]
  allowed = (key >= first) & (np.abs(key - query) > num_window_blocks // 2)
  if causal:
    allowed &= key < query
  return allowed


def draw_random_blocks(key: jax.Array, heads: int, length: int, block_len: int = 64,
                       num_window_blocks: int = 3, num_global_blocks: int = 2,
                       num_random_blocks: int = 3, causal: bool = False) -> jax.Array:
  """Draws the random key blocks of every non-global query block, per head.

  Args:
    key: a PRNG key.
    heads: number of heads (each draws its own blocks).
    length: sequence length.
    block_len: tokens per block.
    num_window_blocks: window blocks (odd), excluded from the draw.
    num_global_blocks: leading global blocks, excluded from the draw.
    num_random_blocks: blocks to draw per query block.
    causal: draw only blocks before the query block's window.

  Returns:
    int32 `[heads, num_blocks - num_global_blocks, slots]`, slots =
    min(num_random_blocks, most candidates of a query block): distinct block
    indices, uniform without replacement, -1 in the slots of query blocks with
    fewer candidates.
  """
  num_blocks = -(-length // block_len)
  allowed = random_candidates(num_blocks, num_window_blocks, num_global_blocks, causal)
  slots = min(num_random_blocks, int(allowed.sum(1).max(initial=0)))
  if slots == 0:
    return jnp.zeros((heads, allowed.shape[0], 0), jnp.int32)
  # The top `slots` of iid uniform scores are a uniform draw without replacement.
  scores = jnp.where(allowed, jax.random.uniform(key, (heads,) + allowed.shape), -1.0)
  top, blocks = jax.lax.top_k(scores, slots)
  return jnp.where(top >= 0, blocks, -1).astype(jnp.int32)


def _gather_blocks(x: jax.Array, blocks: jax.Array, block_len: int) -> jax.Array:
  """Rows `[B, H, nb * block_len, d]` -> the blocks `blocks` `[H, nq, r]` names, `[B * H * nq, 1, r * block_len, d]`.

  Entries below 0 take block 0 (their keys are hidden by position).
  """
  batch, heads, padded, dim = x.shape
  num_blocks = padded // block_len
  flat = (jnp.arange(heads)[:, None, None] * num_blocks + jnp.maximum(blocks, 0)).reshape(-1)
  # Whole blocks as rows of a 2-D array: faster on XLA:CPU than 4-D blocks.
  gathered = jnp.take(x.transpose(1, 2, 0, 3).reshape(heads * num_blocks, -1), flat, axis=0,
                      mode='clip')
  gathered = gathered.reshape(heads, -1, block_len, batch, dim).transpose(3, 0, 1, 2, 4)
  return gathered.reshape(batch * heads * blocks.shape[1], 1, -1, dim)


def bigbird_attention(q: jax.Array, k: jax.Array, v: jax.Array, random_blocks: jax.Array,
                      mask: jax.Array | None = None, causal: bool = False,
                      block_len: int = 64, num_window_blocks: int = 3,
                      num_global_blocks: int = 2, scale: float | None = None) -> jax.Array:
  """BigBird block-sparse attention with the given random blocks.

  Args:
    q: `[batch, len, heads, head_dim]`.
    k: `[batch, len, heads, head_dim]`.
    v: `[batch, len, heads, value_dim]`.
    random_blocks: int `[heads, num_blocks - num_global_blocks, slots]`, the
      random key blocks of each non-global query block (-1 for none), as
      `draw_random_blocks` returns them; each must be a candidate of its query
      block (`random_candidates`) and appear once, else keys count twice.
    mask: None or bool `[batch, len]`, True for real keys.
    causal: query t sees keys s <= t only (random blocks drawn with causal).
    block_len: tokens per block; the length is padded to whole blocks.
    num_window_blocks: odd number of blocks in each query block's window.
    num_global_blocks: leading blocks that see and are seen by every block.
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, len, heads, value_dim]` in the dtype of q; zeros for queries that
    see no key.
  """
  check_options(block_len, num_window_blocks, num_global_blocks, 0)
  batch, length, heads, head_dim = q.shape
  num_blocks = -(-length // block_len)
  first = min(num_global_blocks, num_blocks)
  expected = (heads, num_blocks - first)
  if (getattr(random_blocks, 'ndim', None) != 3 or random_blocks.shape[:2] != expected
      or not jnp.issubdtype(random_blocks.dtype, jnp.integer)):
    raise ValueError(
        f'random_blocks must be an int array [heads, num_blocks - num_global_blocks, slots] '
        f'with [heads, ...] = {expected}, got {getattr(random_blocks, "shape", random_blocks)}')
  scale = base.default_scale(head_dim) if scale is None else scale
  q = q * jnp.asarray(scale, q.dtype)
  padded = num_blocks * block_len
  rows = lambda x: core.to_rows(x, block_len)

  key_pos = core.key_positions(mask, length, block_len)  # [batch or 1, padded]
  q_rows, k_rows, v_rows = rows(q), rows(k), rows(v)
  outputs = []
  if first:
    # Global query blocks over every key.
    global_len = first * block_len
    plan = core.full_plan(global_len, length, global_len, 512, causal)
    out, _ = core.attend(q_rows[:, :, :global_len], core.to_rows(k, plan.kv_block),
                         core.to_rows(v, plan.kv_block), np.arange(global_len)[None],
                         core.key_positions(mask, length, plan.kv_block), plan)
    outputs.append(out)
  if first < num_blocks:
    # The other query blocks over three disjoint key sets, merged by log-sum-exp.
    local_q = q_rows[:, :, first * block_len:]
    local_pos = np.arange(first * block_len, padded)[None]
    parts = []
    # Window: keys padded by `half` blocks in front (and behind unless causal),
    # so that query block i reads the strip of key blocks i - half ... from
    # block i on; global blocks are hidden here, as they are their own part.
    half = num_window_blocks // 2
    after = 0 if causal else half
    band = lambda x, value=0: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [
        (half * block_len, after * block_len), (0, 0)], constant_values=value)[
            ..., first * block_len:, :]
    band_pos = jnp.where(np.arange(padded) < first * block_len, -1, key_pos)
    plan = core.Plan(block_len, (half + 1 + after) * block_len, 1, kv_stride=block_len,
                     causal=causal)
    parts.append(core.attend(local_q, band(k_rows), band(v_rows), local_pos,
                             band(band_pos[..., None], -1)[..., 0], plan))
    if first:
      # Global keys, the same for every query block.
      global_len = first * block_len
      plan = core.Plan(block_len, global_len, 1, causal=causal)
      parts.append(core.attend(local_q, k_rows[:, :, :global_len], v_rows[:, :, :global_len],
                               local_pos, key_pos[:, :global_len], plan))
    if random_blocks.shape[2]:
      # Random blocks, gathered per head; each (batch, head, query block) is a
      # row of its own for the core, with its strip of r blocks.
      num_local = num_blocks - first
      random_pos = jnp.take(jnp.broadcast_to(key_pos, (batch, padded)).reshape(
          batch, num_blocks, block_len), jnp.maximum(random_blocks, 0), axis=1)
      random_pos = jnp.where(random_blocks[None, ..., None] >= 0, random_pos, -1)
      query_pos = np.tile(local_pos.reshape(num_local, block_len), (batch * heads, 1))
      plan = core.Plan(block_len, random_blocks.shape[2] * block_len, 1, causal=causal)
      out, lse = core.attend(local_q.reshape(batch * heads * num_local, 1, block_len, head_dim),
                             _gather_blocks(k_rows, random_blocks, block_len),
                             _gather_blocks(v_rows, random_blocks, block_len), query_pos,
                             random_pos.reshape(batch * heads * num_local, -1), plan)
      parts.append((out.reshape(batch, heads, -1, out.shape[-1]),
                    lse.reshape(batch, heads, -1)))
    outputs.append(core.merge(parts)[0])
  out = jnp.concatenate(outputs, axis=2)
  return out.transpose(0, 2, 1, 3)[:, :length]


@base.register_attention('bigbird')
class BigBirdAttention(base.RandomAttention):
  """BigBird attention (ITC, blocked); options documented in `bigbird_attention`.

  Random blocks (redraw policy): every call draws fresh random blocks, from the
  call's `rngs` when given (no module state is touched, so it works under plain
  `jax.jit` / `jax.grad`), else from the module's 'attention' stream (or
  'default', else 'params'); with `deterministic=True` (or after `.eval()`)
  they come from one key drawn at construction and stored as uint32
  `RandomState`, so evaluation always uses the same blocks. All are
  reproducible from the seed. LRA instead fixes them per layer for good.

  Options: `block_len` (LRA 64), `num_window_blocks` (odd, 3: the block and its
  two neighbours), `num_global_blocks` (leading global blocks, 2),
  `num_random_blocks` (per query block and head, LRA 3).
  """

  def __init__(self, block_len: int = 64, num_window_blocks: int = 3,
               num_global_blocks: int = 2, num_random_blocks: int = 3, *, rngs: nnx.Rngs):
    check_options(block_len, num_window_blocks, num_global_blocks, num_random_blocks)
    self.block_len = block_len
    self.num_window_blocks = num_window_blocks
    self.num_global_blocks = num_global_blocks
    self.num_random_blocks = num_random_blocks
    super().__init__(rngs)

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=True)
    random_blocks = draw_random_blocks(
        self.call_key(deterministic, rngs), q.shape[2], q.shape[1], self.block_len,
        self.num_window_blocks, self.num_global_blocks, self.num_random_blocks, causal)
    return bigbird_attention(q, k, v, random_blocks, mask, causal, self.block_len,
                             self.num_window_blocks, self.num_global_blocks)
