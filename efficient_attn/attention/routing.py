"""Routing attention (Roy et al. 2021, "Efficient Content-Based Sparse Attention with Routing Transformers").

Queries and keys are layer-normalised without scale or bias (the paper's
Algorithm 1) and routed to `num_clusters` centroids shared by both, by dot
product: each cluster takes its w = ceil(length / num_clusters) nearest queries
and, separately, its w nearest keys (top-k per cluster, so every cluster holds
exactly w members: the balanced routing of Algorithm 1). Each cluster's
queries attend to its keys with one softmax (causal by the original positions),
through the shared blocked core (`core.attend`, one block per cluster). A query
routed to several clusters gets the softmax over the union of their keys with
multiplicity (outputs weighted by their log-sum-exps, as `core.merge`); a query
no cluster took gets zeros (as in the public code, whose scatter divides by the
count plus 1e-2). With one cluster every query meets every key: exact attention.

Queries and keys are both routed (not shared-QK): with separate projections a
key's cluster must come from the key itself (Algorithm 1 routes Q and K); the
paper's causal language models share QK, which a layer gets here by passing the
same array as q and k. The public code (google-research `routing_transformer`)
clusters one array and gathers q, k and v at the same positions.

Online k-means: while training, each real query and key is assigned to its
nearest centroid and every centroid that received members moves by an
exponential moving average towards their mean,
mu <- decay * mu + (1 - decay) * mean (`decay` 0.999, the public code's). The public
code keeps moving averages of the sums and the counts separately and divides
them; this module averages each batch's means, which needs no count state. The
update is not differentiated (the routing is discrete); the public code's
commitment loss (beta * |x - mu|^2) is not added, since mechanisms here return
no auxiliary loss. Centroids are `Centroids` state, not `nnx.Param`, so
optimizers leave them alone; `.eval()` or `deterministic=True` freezes them.
A training call replaces them, which works eagerly, under `nnx.jit`, and in
the functional form (`nnx.merge` inside the traced loss, `nnx.split` after, as
the trainer does); under plain `jax.jit` / `jax.grad` / `jax.vmap` of a closure
over a module built outside, the module's state cannot change (state updates
need the nnx transforms, as for `nnx.BatchNorm`): the call routes with the
current centroids, leaves them unchanged and warns.

Centroids are shared by all heads (the public code keeps one set per head)
and stored with `max_head_dim` coordinates, of which inputs with head_dim d use
the first d: the module is built without knowing the number of heads or
head_dim, and the unused coordinates never change a score.

Memory is O(length * w) in the forward and backward pass (plus the
[num_clusters, length] routing scores); gathers are differentiated by scatters.
"""

import warnings

import jax
import jax.numpy as jnp
from flax import errors, nnx

from efficient_attn.attention import base, core

# Added to the variance in the layer norm of routed vectors.
_NORM_EPS = 1e-6


class Centroids(nnx.Variable):
  """Online k-means centroids `[num_clusters, max_head_dim]`: moved by EMA, not by the optimizer."""


def normalise(x: jax.Array) -> jax.Array:
  """Layer norm over the last axis without scale or bias (float32)."""
  x = x.astype(jnp.float32)
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + _NORM_EPS)


def _scores(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """Dot products `[B, H, C, n]` of normalised x `[B, n, H, d]` with the centroids."""
  return jnp.einsum('bnhd,cd->bhcn', normalise(x), centroids[:, :x.shape[-1]])


def _route(x: jax.Array, centroids: jax.Array, valid: jax.Array, width: int) -> jax.Array:
  """Int `[B, H, C, width]`: each cluster's `width` nearest valid rows, in position order."""
  scores = jnp.where(valid[:, None, None, :], _scores(x, centroids), -jnp.inf)
  _, members = jax.lax.top_k(jax.lax.stop_gradient(scores), width)
  return jnp.sort(members, axis=-1)


def _gather(x: jax.Array, members: jax.Array) -> jax.Array:
  """Rows `[B * H, 1, C * w, d]` of x `[B, n, H, d]` at `members` `[B, H, C, w]`."""
  b, n, h, d = x.shape
  rows = x.transpose(0, 2, 1, 3).reshape(b * h * n, d)
  flat = members.reshape(b * h, -1) + (jnp.arange(b * h) * n)[:, None]
  return jnp.take(rows, flat.reshape(-1), axis=0).reshape(b * h, 1, -1, d)


def _scatter_merge(out: jax.Array, lse: jax.Array, members: jax.Array, length: int) -> jax.Array:
  """Per-cluster results back at their positions, merged by lse; `[B * H, length, dv]` float32.

  Args:
    out: `[B * H, C * w, dv]` cluster outputs.
    lse: float32 `[B * H, C * w]` their log-sum-exps.
    members: int `[B * H, C * w]` their positions.
    length: number of positions.
  """
  rows = jnp.arange(members.shape[0])[:, None]
  top = jnp.full((members.shape[0], length), -jnp.inf).at[rows, members].max(lse)
  weight = jnp.exp(lse - jax.lax.stop_gradient(top)[rows, members])
  total = jnp.zeros(top.shape).at[rows, members].add(weight)
  merged = jnp.zeros(top.shape + out.shape[-1:]).at[rows, members].add(
      weight[..., None] * out.astype(jnp.float32))
  return jnp.where(total[..., None] > 0, merged / jnp.where(total > 0, total, 1.0)[..., None], 0.0)


def routing_attention(q: jax.Array, k: jax.Array, v: jax.Array, centroids: jax.Array,
                      mask: jax.Array | None = None, causal: bool = False,
                      scale: float | None = None) -> jax.Array:
  """Routing attention (Roy et al. 2021) with the given k-means centroids.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, heads, head_dim]`.
    v: `[batch, kv_len, heads, value_dim]`.
    centroids: float32 `[num_clusters, D]` with D >= head_dim (the first
      head_dim coordinates are used).
    mask: None or bool `[batch, kv_len]`, True for real keys; with q_len ==
      kv_len (self-attention) also for real queries, which alone are routed.
    causal: query i sees keys j <= i only (needs q_len == kv_len).
    scale: logit scale, default 1/sqrt(head_dim).

  Returns:
    `[batch, q_len, heads, value_dim]` in the dtype of q; zeros for queries that
    see no key or that no cluster took.
  """
  base.check_inputs(q, k, v, mask, self_attention=causal)
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  if getattr(centroids, 'ndim', 0) != 2 or centroids.shape[1] < head_dim:
    raise ValueError(f'centroids must have shape [num_clusters, D >= head_dim={head_dim}], '
                     f'got {getattr(centroids, "shape", type(centroids).__name__)}')
  num_clusters = centroids.shape[0]
  scale = base.default_scale(head_dim) if scale is None else scale
  key_valid = base.key_mask_or_ones(mask, batch, kv_len)
  query_valid = key_valid if q_len == kv_len else jnp.ones((batch, q_len), bool)
  q_width, k_width = -(-q_len // num_clusters), -(-kv_len // num_clusters)
  q_members = _route(q, centroids, query_valid, q_width)
  k_members = _route(k, centroids, key_valid, k_width)
  k_valid = jnp.take_along_axis(key_valid[:, None, None, :], k_members, axis=-1)
  flat = lambda x: x.reshape(batch * heads, -1)
  plan = core.Plan(q_width, k_width, 1, kv_stride=k_width, causal=causal, skip_blocks=False)
  out, lse = core.attend(
      _gather(q * jnp.asarray(scale, q.dtype), q_members), _gather(k, k_members),
      _gather(v.astype(q.dtype), k_members), flat(q_members),
      flat(jnp.where(k_valid, k_members, -1)), plan)
  out = _scatter_merge(out[:, 0], lse[:, 0], flat(q_members), q_len)
  return out.reshape(batch, heads, q_len, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def kmeans_update(centroids: jax.Array, vectors: list[tuple[jax.Array, jax.Array]],
                  decay: float) -> jax.Array:
  """One online k-means step: centroids moved towards the mean of their members.

  Args:
    centroids: float32 `[num_clusters, D]`.
    vectors: (x `[B, n, H, d]`, valid bool `[B, n]`) pairs (queries, keys);
      every valid row is normalised and assigned to its nearest centroid.
    decay: mu <- decay * mu + (1 - decay) * mean of the members, for every
      centroid with members (the others stay).

  Returns:
    The new centroids, same shape, with no gradient.
  """
  head_dim = vectors[0][0].shape[-1]
  num_clusters = centroids.shape[0]
  sums = jnp.zeros((num_clusters, head_dim))
  counts = jnp.zeros((num_clusters,))
  for x, valid in vectors:
    nearest = jnp.argmax(_scores(x, centroids), axis=2)  # [B, H, n]
    members = jax.nn.one_hot(nearest, num_clusters) * valid[:, None, :, None]
    sums = sums + jnp.einsum('bhnc,bnhd->cd', members, normalise(x))
    counts = counts + members.sum((0, 1, 2))
  used = centroids[:, :head_dim]
  moved = decay * used + (1 - decay) * sums / jnp.maximum(counts, 1.0)[:, None]
  new = centroids.at[:, :head_dim].set(jnp.where(counts[:, None] > 0, moved, used))
  return jax.lax.stop_gradient(new)


@base.register_attention('routing')
class RoutingAttention(base.Attention):
  """Routing attention with online k-means; options documented in the module docstring.

  Options: `num_clusters` (each cluster holds ceil(length / num_clusters)
  queries and as many keys; sqrt(length) clusters balance routing and
  attention costs, the paper's choice); `decay` of the centroids' moving
  average (0.999, the public code's); `max_head_dim`, the largest head_dim the
  centroids serve. Centroids start as standard normal vectors (the public code
  layer-normalises them, which the first head_dim coordinates of a normal
  vector match in scale). `deterministic=True` or `.eval()` freezes them; the
  call's `rngs` are accepted and unused (routing draws nothing at call time).
  """

  def __init__(self, num_clusters: int = 16, decay: float = 0.999, max_head_dim: int = 128,
               *, rngs: nnx.Rngs):
    base.check_positive_int('num_clusters', num_clusters)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
      raise ValueError(f'decay must be a number in [0, 1], got {decay!r}')
    base.check_positive_int('max_head_dim', max_head_dim)
    self.num_clusters = num_clusters
    self.decay = decay
    self.max_head_dim = max_head_dim
    self.deterministic = False
    self.centroids = Centroids(jax.random.normal(rngs.params(), (num_clusters, max_head_dim)))

  def __call__(self, q, k, v, mask=None, causal=False, *, deterministic=None, rngs=None):
    base.check_inputs(q, k, v, mask, self_attention=causal)
    if q.shape[-1] > self.max_head_dim:
      raise ValueError(f'head_dim {q.shape[-1]} is larger than max_head_dim='
                       f'{self.max_head_dim}; build routing with max_head_dim >= {q.shape[-1]}')
    centroids = self.centroids[...]
    out = routing_attention(q, k, v, centroids, mask, causal)
    if not (self.deterministic if deterministic is None else deterministic):
      key_valid = base.key_mask_or_ones(mask, k.shape[0], k.shape[1])
      query_valid = key_valid if q.shape[1] == k.shape[1] else jnp.ones(q.shape[:2], bool)
      new = kmeans_update(centroids, [(q, query_valid), (k, key_valid)], self.decay)
      try:
        # A new Variable rather than an in-place write: the trainer merges the
        # module inside its loss, where only the module, not the Variables it
        # was given, belongs to the current trace.
        self.centroids = Centroids(new)
      except errors.TraceContextError:
        warnings.warn(
            'routing: the k-means centroids cannot be updated under plain jax.jit/grad/vmap '
            'of a module built outside them; this training call left them unchanged. Use '
            'nnx.jit, or nnx.merge inside jax.jit and nnx.split after, to train them, or '
            'deterministic=True to route with frozen centroids.', stacklevel=2)
    return out
