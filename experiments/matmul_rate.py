"""Plain matmul rate of XLA:CPU against PyTorch on the shapes of a 512-wide attention layer.

  python -m experiments.matmul_rate

Times forward+backward (the product and both input gradients, for a random
cotangent) of `[n, 512] @ [512, 1536]` (fused q/k/v projections) and of one
softmax attention over 256 keys (Linformer's projected keys), in JAX and, when
installed (requirements-peers.txt), in PyTorch, alternating round by round in
one process. Writes experiments/results/matmul_rate.md.
"""

import argparse
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = pathlib.Path(__file__).parent / 'results' / 'matmul_rate.md'


def jax_cases(n: int) -> dict:
  """Name -> (jitted fwd+bwd function, its arguments, GFLOP)."""
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((n, 512), np.float32), rng.standard_normal((512, 1536), np.float32)
  cot = rng.standard_normal((n, 1536), np.float32)
  q = rng.standard_normal((8, n, 64), np.float32)
  k, v = (rng.standard_normal((8, 256, 64), np.float32) for _ in range(2))
  attn_cot = rng.standard_normal((8, n, 64), np.float32)

  def projection(x, w, cot):
    y, pullback = jax.vjp(jnp.matmul, x, w)
    return y, pullback(cot)

  def attention(q, k, v, cot):
    f = lambda q, k, v: jax.nn.softmax(q @ k.transpose(0, 2, 1) * 0.125, axis=-1) @ v
    y, pullback = jax.vjp(f, q, k, v)
    return y, pullback(cot)

  return {'projection [n,512]x[512,1536]': (jax.jit(projection), (x, w, cot), 3 * 2 * n * 512 * 1536 / 1e9),
          'attention 8 heads x 256 keys': (jax.jit(attention), (q, k, v, attn_cot),
                                           6 * 2 * 8 * n * 256 * 64 / 1e9)}


def torch_cases(n: int) -> dict:
  """The same cases in PyTorch, or {} when it is not installed."""
  try:
    import torch
  except ImportError:
    return {}
  torch.set_num_threads(os.cpu_count())
  x, w = torch.randn(n, 512, requires_grad=True), torch.randn(512, 1536, requires_grad=True)
  cot = torch.randn(n, 1536)
  q = torch.randn(8, n, 64, requires_grad=True)
  k, v = (torch.randn(8, 256, 64, requires_grad=True) for _ in range(2))
  attn_cot = torch.randn(8, n, 64)

  def projection():
    return torch.autograd.grad(x @ w, (x, w), cot)

  def attention():
    y = torch.softmax(q @ k.transpose(1, 2) * 0.125, dim=-1) @ v
    return torch.autograd.grad(y, (q, k, v), attn_cot)

  return {'projection [n,512]x[512,1536]': projection, 'attention 8 heads x 256 keys': attention}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--length', type=int, default=4096)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  jax_fns, torch_fns = jax_cases(args.length), torch_cases(args.length)
  best = {}
  for _ in range(args.rounds + 1):  # the first round warms up and is dropped below
    for name, (fn, fn_args, _) in jax_fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))
      best.setdefault(('jax', name), []).append(time.perf_counter() - start)
    for name, fn in torch_fns.items():
      start = time.perf_counter()
      fn()
      best.setdefault(('torch', name), []).append(time.perf_counter() - start)
  lines = ['# Plain matmul rate, XLA:CPU against PyTorch', '',
           f'Command: `python -m experiments.matmul_rate --length {args.length} '
           f'--rounds {args.rounds}`', '',
           f'{os.cpu_count()} cores, jax {jax.__version__}; load average at the end '
           f'{os.getloadavg()[0]:.2f}. Forward+backward for a random cotangent, float32, '
           f'n={args.length}; min over {args.rounds} rounds after a warm-up, JAX and '
           'PyTorch alternating in one process.', '',
           '| case | GFLOP | jax s | jax GFLOP/s | torch s | torch GFLOP/s | jax / torch rate |',
           '|---|---|---|---|---|---|---|']
  for name, (_, _, gflop) in jax_fns.items():
    jax_s = min(best[('jax', name)][1:])
    row = f'| {name} | {gflop:.1f} | {jax_s:.4f} | {gflop / jax_s:.0f} |'
    if ('torch', name) in best:
      torch_s = min(best[('torch', name)][1:])
      row += f' {torch_s:.4f} | {gflop / torch_s:.0f} | {torch_s / jax_s:.2f} |'
    else:
      row += ' - | - | - |'
    lines.append(row)
  RESULTS.write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
