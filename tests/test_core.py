"""The blocked softmax core against a float64 dense oracle of the same plan and rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn.attention import core

B, H, D = 2, 2, 8
NO_KEY_LSE = np.float32(core.NO_KEY_LSE)


def reach(plan, q_len, k_len):
  """Bool `[q_len, k_len]`: is key j in a key block that query i's block reads."""
  start = np.arange(q_len)[:, None] // plan.q_block * plan.kv_stride
  cols = np.arange(k_len)[None, :]
  return (cols >= start) & (cols < start + plan.kv_steps * plan.kv_block)


def oracle(q, k, v, q_pos, k_pos, plan):
  """out and lse with the full `[Lq, Lk]` logits, in float64."""
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
    qp, kp = np.asarray(q_pos)[:, None, :, None], np.asarray(k_pos)[:, None, None, :]
    visible = (kp >= 0) & reach(plan, q.shape[2], k.shape[2])
    if plan.causal:
      visible = visible & (kp <= qp)
    if plan.window is not None:
      visible = visible & (qp - kp <= plan.window) & (plan.causal or (kp - qp <= plan.window))
    own = visible & (kp == qp) & plan.own_key

    def attention(q, k, v):
      s = jnp.where(visible, jnp.einsum('bhqd,bhkd->bhqk', q, k), -jnp.inf)
      s = jnp.where(own, core.OWN_KEY_VALUE, s)
      seen = visible.any(-1)
      lse = jnp.where(seen, jax.nn.logsumexp(jnp.where(seen[..., None], s, 0.0), axis=-1),
                      core.NO_KEY_LSE)
      p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
      return jnp.einsum('bhqk,bhkd->bhqd', p, v), lse

    return values_and_grads(attention, q, k, v)


def values_and_grads(attention, q, k, v):
  """(out, lse, dq, dk, dv) as numpy float64, for fixed cotangents of out and lse."""
  (out, lse), pullback = jax.vjp(attention, q, k, v)
  rng = np.random.default_rng(5)
  cotangents = (jnp.asarray(rng.normal(size=out.shape), out.dtype),
                jnp.asarray(rng.normal(size=lse.shape), lse.dtype))
  return [np.asarray(x, np.float64) for x in (out, lse) + pullback(cotangents)]


def run_core(q, k, v, q_pos, k_pos, plan):
  return values_and_grads(jax.jit(lambda q, k, v: core.attend(q, k, v, q_pos, k_pos, plan)),
                          q, k, v)


def inputs(q_len, k_len, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda length: jnp.asarray(rng.normal(size=(B, H, length, D)), jnp.float32)
  return make(q_len), make(k_len), make(k_len)


def assert_matches_oracle(q, k, v, q_pos, k_pos, plan, rtol=2e-6):
  got = run_core(q, k, v, q_pos, k_pos, plan)
  want = oracle(q, k, v, q_pos, k_pos, plan)
  for name, g, w in zip(('out', 'lse', 'dq', 'dk', 'dv'), got, want):
    assert np.all(np.isfinite(g)), name
    if name == 'lse':
      # Rows with no key or only their own key carry the constants (in float32).
      real = w > core.NO_KEY_THRESHOLD / 2
      np.testing.assert_array_equal(g[~real], w[~real].astype(np.float32))
      g, w = g[real], w[real]
    error = np.abs(g - w).max(initial=0) / max(np.abs(w).max(initial=0), 1.0)
    assert error < rtol, f'{name}: relative error {error}'
  return got


def padded_positions(length, keep, seed):
  """Positions 0..length-1 with about 1 - keep of them padding (-1), per batch row."""
  hidden = np.random.default_rng(seed).random((B, length)) > keep
  return np.where(hidden, -1, np.arange(length))


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('padded', [False, True])
def test_full_plan(causal, padded):
  # Lengths over several blocks, so that skipped, unmasked and masked blocks all occur.
  q_len, k_len = 40, 56
  plan = core.full_plan(q_len, k_len, 16, 8, causal)
  q, k, v = inputs(48, k_len)
  k_pos = padded_positions(k_len, 0.7, 1) if padded else np.arange(k_len)[None]
  assert_matches_oracle(q, k, v, np.arange(48)[None], k_pos, plan)


@pytest.mark.parametrize('causal', [False, True])
def test_window_plan(causal):
  # A band: query block i reads the strip of key blocks i .. i + 2 of keys
  # padded by one block in front, so positions of keys are shifted by one block.
  block, window, q_len = 8, 5, 32
  plan = core.Plan(block, block, 2 if causal else 3, kv_stride=block, causal=causal,
                   window=window)
  k_len = q_len + block * (2 if not causal else 1)
  q, k, v = inputs(q_len, k_len)
  k_pos = np.where(np.arange(k_len) < block, -1, np.arange(k_len))
  k_pos = np.where(padded_positions(k_len, 0.8, 2) >= 0, k_pos, -1)
  assert_matches_oracle(q, k, v, np.arange(q_len)[None] + block, k_pos, plan)


@pytest.mark.parametrize('skip_blocks', [True, False])
def test_own_key_rule_with_unordered_positions(skip_blocks):
  # LSH-like: positions in any order, each query block reads its chunk and the
  # one before (a wrapped chunk in front), a query's own key gets a fixed logit.
  chunk, chunks = 8, 4
  plan = core.Plan(chunk, 2 * chunk, 1, kv_stride=chunk, causal=True, own_key=True,
                   skip_blocks=skip_blocks)
  rng = np.random.default_rng(3)
  q_pos = np.stack([rng.permutation(chunk * chunks) for _ in range(B)])
  k_pos = np.concatenate([q_pos[:, -chunk:], q_pos], axis=1)
  k_pos[0, chunk:2 * chunk] = -1  # padding keys
  q, _, v = inputs(chunk * chunks, chunk * (chunks + 1))
  k = jnp.concatenate([q[:, :, -chunk:], q], axis=2)  # shared query-keys
  got = assert_matches_oracle(q, k, v, q_pos, k_pos, plan)
  # Some queries see only their own key: they return its value.
  lse = got[1]
  assert np.any(lse == np.float32(core.OWN_KEY_VALUE))


def test_rows_that_see_no_key():
  plan = core.full_plan(16, 16, 8, 8, causal=True)
  q, k, v = inputs(16, 16)
  # Batch row 0: every key is padding; row 1: keys 0..5 are, so queries 0..5 see none.
  k_pos = np.stack([np.full(16, -1), np.where(np.arange(16) < 6, -1, np.arange(16))])
  out, lse, dq, dk, dv = assert_matches_oracle(q, k, v, np.arange(16)[None], k_pos, plan)
  assert np.all(out[0] == 0) and np.all(out[1, :, :6] == 0)
  assert np.all(lse[0] == NO_KEY_LSE) and np.all(lse[1, :, :6] == NO_KEY_LSE)
  assert np.all(dq[0] == 0) and np.all(dq[1, :, :6] == 0)
  assert np.all(dk[0] == 0) and np.all(dv[0] == 0)


def test_merge_of_disjoint_key_sets_is_one_call():
  plan = core.full_plan(24, 24, 8, 8, causal=False)
  q, k, v = inputs(24, 24, seed=4)
  k_pos = padded_positions(24, 0.9, 5)
  k_pos[1, 12:] = -1
  q_pos = np.arange(24)[None]
  first = np.where(np.arange(24) < 12, k_pos, -1)  # keys 0..11
  second = np.where(np.arange(24) >= 12, k_pos, -1)  # keys 12..23; none in batch row 1
  nothing = np.full_like(k_pos, -1)

  def merged(q, k, v):
    parts = [core.attend(q, k, v, q_pos, pos, plan) for pos in (first, second, nothing)]
    return core.merge(parts)

  got = values_and_grads(jax.jit(merged), q, k, v)
  want = run_core(q, k, v, q_pos, k_pos, plan)
  for name, g, w in zip(('out', 'lse', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_merge_when_no_part_saw_a_key():
  plan = core.full_plan(8, 8, 8, 8, causal=False)
  q, k, v = inputs(8, 8)
  nothing = np.full((1, 8), -1)
  merged = lambda q, k, v: core.merge([core.attend(q, k, v, np.arange(8)[None], nothing, plan)] * 2)
  out, lse, dq, dk, dv = values_and_grads(jax.jit(merged), q, k, v)
  assert np.all(out == 0) and np.all(lse == NO_KEY_LSE)
  for grad in (dq, dk, dv):
    assert np.all(grad == 0)


def test_rows_in_groups_match_the_oracle(monkeypatch):
  # On CPU, large blocks take one of the B x H rows per step; force that here.
  monkeypatch.setattr(core, '_CPU_STEP_BYTES', 1)
  plan = core.full_plan(24, 24, 8, 8, causal=True)
  assert core.rows_per_step(B, H, plan) == ((1, 1) if jax.default_backend() == 'cpu' else (B, H))
  q, k, v = inputs(24, 24, seed=6)
  assert_matches_oracle(q, k, v, np.arange(24)[None], padded_positions(24, 0.8, 7), plan)
