"""Routing attention: exact limit, oracle, online k-means, freezing, causality, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
from efficient_attn.attention import full, routing
from helpers import (assert_exact_at_real_positions, bfloat16_close_to_float32,
                     causal_zero_gradient_at_every_split,
                     fully_masked_row_gives_zeros_and_finite_gradients, largest_array, normal_qkv,
                     padding_changes_no_real_output, pmap_over_four_devices_matches_one_call, real)

BATCH, LENGTH, HEADS, DIM, VALUE_DIM = 2, 20, 2, 8, 6
CLUSTERS = 4  # windows of 5
MASK = np.arange(LENGTH)[None, :] < np.array([[14], [7]])


def inputs(dtype=jnp.float32, seed=0):
  return normal_qkv((BATCH, LENGTH, HEADS, DIM), VALUE_DIM, dtype, seed)


def centroids(count=CLUSTERS, width=DIM + 3, seed=2):
  return jax.random.normal(jax.random.key(seed), (count, width))


def test_one_cluster_equals_exact_attention_outputs_and_gradients():
  one = centroids(1)
  assert_exact_at_real_positions(
      lambda q, k, v, mask, causal: routing.routing_attention(q, k, v, one, mask, causal),
      *inputs(), MASK)


def oracle(q, k, v, means, mask, causal):
  """numpy: top-w members per cluster, softmax within, lse-weighted over a query's clusters."""
  q, k, v, means = (np.asarray(x, np.float64) for x in (q, k, v, means))
  b, n, h, d = q.shape
  width = -(-n // len(means))
  norm = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  out = np.zeros((b, n, h, v.shape[-1]))
  for bi, hi in np.ndindex(b, h):
    parts = [[] for _ in range(n)]
    for c in range(len(means)):
      pick = lambda x: np.argsort(-np.where(mask[bi], norm(x[bi, :, hi]) @ means[c, :d],
                                            -np.inf), kind='stable')[:width]
      queries, keys = pick(q), pick(k)
      for i in queries:
        visible = mask[bi, keys] & ((keys <= i) if causal else True)
        if visible.any():
          s = k[bi, keys, hi] @ q[bi, i, hi] / np.sqrt(d)
          s = np.where(visible, s, -np.inf)
          top = s.max()
          w = np.exp(s - top)
          parts[i].append((w @ v[bi, keys, hi] / w.sum(), top + np.log(w.sum())))
    for i, found in enumerate(parts):
      if found:
        lse = np.array([l for _, l in found])
        weights = np.exp(lse - lse.max())
        out[bi, i, hi] = sum(w * o for w, (o, _) in zip(weights, found)) / weights.sum()
  return out


@pytest.mark.parametrize('causal', [False, True])
def test_matches_numpy_oracle_with_several_clusters_and_padding(causal):
  q, k, v = inputs()
  got = jax.jit(lambda q, k, v: routing.routing_attention(q, k, v, centroids(), MASK, causal))(
      q, k, v)
  np.testing.assert_allclose(real(got, MASK),
                             real(oracle(q, k, v, centroids(), MASK, causal), MASK), atol=1e-5)


def test_kmeans_update_moves_centroids_towards_the_mean_of_their_members():
  q, k, _ = inputs()
  old = centroids()
  new = routing.kmeans_update(old, [(q, MASK), (k, MASK)], decay=0.9)
  members = [np.asarray(routing.normalise(x))[MASK] for x in (q, k)]  # [real, H, d]
  vectors = np.concatenate(members).reshape(-1, DIM)
  nearest = np.argmax(vectors @ np.asarray(old[:, :DIM]).T, axis=-1)
  for c in range(CLUSTERS):
    if not np.any(nearest == c):
      np.testing.assert_array_equal(new[c], old[c])
      continue
    mean = vectors[nearest == c].mean(0)
    np.testing.assert_allclose(new[c, :DIM], 0.9 * old[c, :DIM] + 0.1 * mean, atol=1e-5)
    assert np.linalg.norm(new[c, :DIM] - mean) < np.linalg.norm(old[c, :DIM] - mean)
  np.testing.assert_array_equal(new[:, DIM:], old[:, DIM:])  # unused coordinates
  assert len(set(nearest)) > 1


def test_training_updates_centroids_eval_and_deterministic_freeze_them():
  q, k, v = inputs()
  attn = ea.make_attention('routing', num_clusters=CLUSTERS, decay=0.5, rngs=nnx.Rngs(0))
  start = np.asarray(attn.centroids[...])
  out = attn(q, k, v, mask=MASK)
  want = routing.kmeans_update(jnp.asarray(start), [(q, MASK), (k, MASK)], 0.5)
  np.testing.assert_allclose(attn.centroids[...], want, atol=1e-6)
  np.testing.assert_allclose(out, routing.routing_attention(q, k, v, jnp.asarray(start), MASK),
                             atol=1e-6)  # routed with the centroids before the update
  trained = np.asarray(attn.centroids[...])
  attn(q, k, v, mask=MASK, deterministic=True)
  attn.eval()
  attn(q, k, v, mask=MASK)
  np.testing.assert_array_equal(attn.centroids[...], trained)
  attn.train()
  nnx.jit(lambda attn, q: attn(q, k, v, mask=MASK))(attn, q)
  assert not np.allclose(attn.centroids[...], trained)
  assert isinstance(attn.centroids, routing.Centroids)
  assert not nnx.state(attn, nnx.Param)  # nothing for an optimizer


def test_plain_jit_training_call_warns_and_functional_form_returns_the_update():
  q, k, v = inputs()
  attn = ea.make_attention('routing', num_clusters=CLUSTERS, rngs=nnx.Rngs(0))
  start = np.asarray(attn.centroids[...])
  with pytest.warns(UserWarning, match='cannot be updated under plain jax.jit'):
    jax.jit(lambda q: attn(q, k, v))(q)
  np.testing.assert_array_equal(attn.centroids[...], start)
  graphdef, state = nnx.split(attn)

  def loss(q, state):  # as the trainer: merged inside the differentiated loss
    module = nnx.merge(graphdef, state)
    return jnp.sum(module(q, k, v)), nnx.split(module)[1]

  _, state = jax.jit(jax.grad(loss, has_aux=True))(q, state)
  every = np.ones(q.shape[:2], bool)
  want = routing.kmeans_update(jnp.asarray(start), [(q, every), (k, every)], attn.decay)
  np.testing.assert_allclose(state['centroids'][...], want, atol=1e-6)


def test_causal_has_zero_gradient_from_the_future_at_every_split():
  causal_zero_gradient_at_every_split(
      lambda q, k, v: routing.routing_attention(q, k, v, centroids(), MASK, True), *inputs(),
      (4, 9, 13))


def test_padding_invariance_of_outputs_and_centroid_updates():
  q, k, v = inputs()
  call = jax.jit(lambda q, k, v, causal: routing.routing_attention(
      q, k, v, centroids(), MASK, causal), static_argnums=3)
  changed = padding_changes_no_real_output(call, (q, k, v), inputs(seed=1), MASK)
  update = lambda q, k: routing.kmeans_update(centroids(), [(q, MASK), (k, MASK)], 0.9)
  np.testing.assert_allclose(update(*changed[:2]), update(q, k), atol=1e-6)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  fully_masked_row_gives_zeros_and_finite_gradients(
      lambda q, k, v, mask, causal: routing.routing_attention(q, k, v, centroids(), mask, causal),
      *inputs(), MASK)


def test_cross_attention_routes_queries_and_keys_separately():
  q, k, v = inputs()
  got = routing.routing_attention(q[:, :12], k, v, centroids(), MASK)
  assert got.shape == (BATCH, 12, HEADS, VALUE_DIM) and np.all(np.isfinite(got))
  np.testing.assert_allclose(routing.routing_attention(q[:, :12], k, v, centroids(1), MASK),
                             full.dense_attention(q[:, :12], k, v, MASK), atol=1e-6)


def test_pmap_over_four_devices_matches_one_call():
  pmap_over_four_devices_matches_one_call(
      lambda q, k, v, m: routing.routing_attention(q, k, v, centroids(), m, True), *inputs(), MASK)


def test_bfloat16_close_to_float32_with_one_cluster():
  bfloat16_close_to_float32(
      lambda q, k, v: routing.routing_attention(q, k, v, centroids(1), MASK), *inputs(), MASK)


def test_errors():
  q, k, v = inputs()
  for option, value, message in (('num_clusters', 0, 'num_clusters must be a positive int'),
                                 ('decay', 1.5, r'decay must be a number in \[0, 1\]'),
                                 ('max_head_dim', -1, 'max_head_dim must be a positive int')):
    with pytest.raises(ValueError, match=message):
      ea.make_attention('routing', rngs=nnx.Rngs(0), **{option: value})
  small = ea.make_attention('routing', max_head_dim=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='head_dim 8 is larger than max_head_dim=4'):
    small(q, k, v)
  with pytest.raises(ValueError, match='needs q_len == kv_len'):
    routing.routing_attention(q[:, :12], k, v, centroids(), causal=True)
  with pytest.raises(ValueError, match='centroids must have shape'):
    routing.routing_attention(q, k, v, centroids(width=4))
  with pytest.raises(ValueError, match='needs rngs'):
    ea.make_attention('routing')


def test_no_quadratic_array_in_forward_or_backward():
  n, heads, clusters = 2048, 2, 32
  x = jax.ShapeDtypeStruct((1, n, heads, 16), jnp.float32)
  means = centroids(clusters, 16)
  for causal in (False, True):
    loss = lambda q, k, v: jnp.sum(routing.routing_attention(q, k, v, means, causal=causal))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x).jaxpr
    # Routing scores [heads, clusters, n] and one cluster's [heads, w, w] logits.
    assert largest_array(jaxpr) <= heads * clusters * n
