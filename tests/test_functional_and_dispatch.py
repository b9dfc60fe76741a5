"""The pure functional path equals the modules; the exact-attention backend dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_attn as ea
import efficient_attn.functional as F
from efficient_attn.attention import full

B, N, H, D = 2, 24, 2, 8
MASK = np.arange(N)[None, :] < np.array([[24], [15]])


def qkv(value_dim=D, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k = (jax.random.normal(key, (B, N, H, D), dtype) for key in keys[:2])
  return q, k, jax.random.normal(keys[2], (B, N, H, value_dim), dtype)


def test_functional_equals_the_modules_with_their_fixed_state():
  q, k, v = qkv()
  rngs = nnx.Rngs(0)
  lsh = ea.make_attention('lsh', chunk_len=8, n_hashes=2, rngs=rngs)
  rotations = F.draw_rotations(jax.random.wrap_key_data(lsh.fixed_key[...]), H, 2, D,
                               F.default_n_buckets(N, 8))
  performer = ea.make_attention('performer', num_features=16, rngs=rngs)
  features = F.draw_orthogonal_features(jax.random.wrap_key_data(performer.fixed_key[...]),
                                        16, D)
  linformer = ea.make_attention('linformer', max_len=N, k=8, rngs=rngs)
  pairs = [
      (ea.make_attention('full', backend='blocked'), lambda: F.blocked_attention(q, k, v, MASK)),
      (lsh, lambda: F.lsh_attention(q, k, v, rotations, MASK, chunk_len=8)),
      (performer, lambda: F.favor_attention(q, k, v, features, MASK)),
      (linformer, lambda: F.linformer_attention(q, k, v, linformer.key_projection[...],
                                                linformer.value_projection[...], MASK)),
      (ea.make_attention('longformer', window=3),
       lambda: F.sliding_window_attention(q, k, v, MASK, window=3)),
  ]
  for module, pure in pairs:
    # Jitted: one compile instead of many op-by-op dispatches.
    call = jax.jit(lambda q, k, v: module(q, k, v, mask=MASK, deterministic=True))
    np.testing.assert_allclose(call(q, k, v), jax.jit(pure)(), atol=1e-6, err_msg=module.name)


@pytest.mark.parametrize('causal', [False, True])
def test_xla_backend_takes_value_dim_unlike_head_dim(causal):
  q, k, v = qkv(value_dim=5)
  got = ea.make_attention('full', backend='xla')(q, k, v, mask=MASK, causal=causal)
  assert got.shape == (B, N, H, 5)
  np.testing.assert_allclose(got, ea.dense_attention(q, k, v, MASK, causal), atol=1e-5)


def test_prefix_mask_as_key_lengths_equals_the_mask():
  q, k, v = qkv()
  lengths = jnp.asarray(MASK.sum(-1), jnp.int32)
  for causal in (False, True):
    got = full.xla_attention(q, k, v, MASK, causal, key_lengths=lengths)
    np.testing.assert_allclose(got, ea.dense_attention(q, k, v, MASK, causal), atol=1e-5)
  assert bool(full.is_prefix_mask(jnp.asarray(MASK)))
  assert not bool(full.is_prefix_mask(jnp.asarray(MASK[:, ::-1])))


def test_auto_dispatch_per_platform():
  half = qkv(dtype=jnp.bfloat16)
  single = qkv()
  odd_value = qkv(value_dim=4, dtype=jnp.bfloat16)
  assert full.select_backend('auto', *half, platform='gpu') == 'cudnn'
  assert full.select_backend('auto', *single, platform='gpu') == 'blocked'
  assert full.select_backend('auto', *odd_value, platform='gpu') == 'blocked'
  assert full.select_backend('auto', *half, platform='cpu') == 'blocked'
  assert full.select_backend('auto', *half, platform='tpu') == 'blocked'  # 24 rows: no 128-row blocks
  long = [jnp.zeros((1, 256, 2, 128))] * 3
  assert full.select_backend('auto', *long, platform='tpu') == 'pallas_tpu'
  assert full.select_backend('dense', *half, platform='gpu') == 'dense'
  assert full.select_backend('auto', *half) == 'blocked'  # this machine: CPU


def test_cudnn_fails_clearly_off_gpu_and_for_unsupported_inputs():
  with pytest.raises(ValueError, match="backend='cudnn' needs a GPU"):
    ea.make_attention('full', backend='cudnn')(*qkv(dtype=jnp.bfloat16))
  with pytest.raises(ValueError, match='float16 or bfloat16'):
    full.select_backend('cudnn', *qkv(), platform='gpu')
