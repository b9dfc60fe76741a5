"""How close each efficient mechanism gets to exact attention, as a function of its budget.

Usage:
  python -m experiments.approximation

Queries, keys and values come from a random-init attention layer applied to real
text (byte embeddings of Python standard-library source plus sinusoidal
positions), and, for contrast, from white noise. For each mechanism and budget
the error is ||Y - Y_exact|| / ||Y_exact|| (Frobenius, averaged over seeds),
with Y_exact from exact attention on the same q, k, v. The budget axis is the
number of keys (or features) each query pays for: Performer `num_features`,
Linformer `k`, Longformer 2 * window + 1, LSH n_hashes * 3 * chunk_len (own,
previous and next chunk), local `block_len`, sparse (fixed) block_len plus the
summary keys of all blocks, BigBird 8 blocks, Sinkhorn 2 blocks (own and sorted),
Routing length / num_clusters. Sinkhorn and Routing run with their learned parts
at initialisation. `linear` and `synthesizer` are left out: they are other
models, not approximations of softmax attention with a budget.
Writes experiments/results/approximation.{md,json,png}.
"""

import argparse
import json
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import efficient_attn as ea

HEADS, HEAD_DIM, MODEL_DIM = 8, 64, 512

def sweeps(length: int) -> dict:
  """{mechanism: [(options, budget)]}: the budgets each mechanism is run at, for `length`."""
  return {
      'performer': [({'num_features': m}, m) for m in (16, 32, 64, 128, 256, 512, 1024)],
      'linformer': [({'k': k, 'max_len': length}, k) for k in (16, 32, 64, 128, 256, 512, 1024)],
      'longformer': [({'window': w}, 2 * w + 1) for w in (8, 16, 32, 64, 128, 256, 512)],
      'lsh': [({'chunk_len': c, 'n_hashes': h, 'shared_qk': False, 'n_chunks_after': 1},
               3 * c * h)
              for c, h in ((16, 1), (16, 2), (32, 2), (64, 2), (64, 4), (128, 4), (256, 4))],
      'local': [({'block_len': b}, b) for b in (16, 32, 64, 128, 256, 512)],
      'sparse': [({'pattern': 'fixed', 'block_len': b, 'summary_len': 8}, b + length // b * 8)
                 for b in (32, 64, 128, 256, 512)],
      # 3 window, 2 global and 3 random blocks per query block.
      'bigbird': [({'block_len': b}, 8 * b) for b in (8, 16, 32, 64, 128)],
      'sinkhorn': [({'block_len': b}, 2 * b) for b in (16, 32, 64, 128, 256, 512)],
      'routing': [({'num_clusters': c}, -(-length // c)) for c in (64, 32, 16, 8, 4)],
  }


def text_bytes(length: int, seed: int) -> np.ndarray:
  """`length` consecutive bytes of a standard-library source file chosen by `seed`."""
  lib = sysconfig.get_paths()['stdlib']
  names = sorted(n for n in os.listdir(lib) if n.endswith('.py'))
  rng = np.random.default_rng(seed)
  while True:
    with open(os.path.join(lib, names[rng.integers(len(names))]), 'rb') as f:
      data = f.read()
    if len(data) > length:
      start = rng.integers(len(data) - length)
      return np.frombuffer(data[start:start + length], np.uint8)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """The sine/cosine position encodings of Vaswani et al. 2017."""
  position = np.arange(length)[:, None]
  frequency = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
  angles = position * frequency
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def text_qkv(length: int, seed: int, logit_std: float = 2.0):
  """q, k, v from a random-init attention layer on real text.

  q and k are rescaled so that the attention logits q.k / sqrt(d) have standard
  deviation `logit_std`, about that of a trained layer.
  """
  rngs = nnx.Rngs(seed)
  embed = nnx.Embed(256, MODEL_DIM, rngs=rngs)
  mha = ea.MultiHeadAttention(num_heads=HEADS, in_features=MODEL_DIM, rngs=rngs)
  tokens = jnp.asarray(text_bytes(length, seed))[None]
  x = embed(tokens) + sinusoidal_positions(length, MODEL_DIM)[None]
  q, k, v = mha.query(x), mha.key(x), mha.value(x)
  sample = jnp.einsum('bqhd,bkhd->bhqk', q[:, :256], k[:, :256]) / np.sqrt(HEAD_DIM)
  factor = jnp.sqrt(logit_std / jnp.std(sample))
  return factor * q, factor * k, v


def noise_qkv(length: int, seed: int):
  """q, k, v of independent standard normals."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (1, length, HEADS, HEAD_DIM)) for key in keys)


def relative_error(y, y_exact) -> float:
  return float(jnp.linalg.norm(y - y_exact) / jnp.linalg.norm(y_exact))


def run(length: int, seeds: int) -> list[dict]:
  """Error of every (mechanism, budget, input kind), averaged over seeds."""
  exact = ea.make_attention('full', backend='blocked')
  rows = []
  for kind, make_qkv in (('text', text_qkv), ('noise', noise_qkv)):
    inputs = [make_qkv(length, seed) for seed in range(seeds)]
    references = [exact(q, k, v) for q, k, v in inputs]
    for name, sweep in sweeps(length).items():
      for options, budget in sweep:
        errors = []
        for seed, ((q, k, v), y_exact) in enumerate(zip(inputs, references)):
          attn = ea.make_attention(name, rngs=nnx.Rngs(seed), **options)
          errors.append(relative_error(attn(q, k, v), y_exact))
        rows.append({'input': kind, 'attention': name, 'options': options, 'budget': budget,
                     'error': float(np.mean(errors)), 'error_std': float(np.std(errors))})
        print(json.dumps(rows[-1]), flush=True)
  return rows


def write_results(rows: list[dict], length: int, seeds: int, out_stem: str) -> None:
  """Writes the rows as json, a markdown table and a plot of error against budget."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  with open(out_stem + '.json', 'w') as f:
    json.dump({'length': length, 'seeds': seeds, 'rows': rows}, f, indent=1)
  lines = ['# Approximation error against exact attention', '',
           f'Command: `python -m experiments.approximation --length {length} --seeds {seeds}`', '',
           f'Length {length}, {HEADS} heads, head_dim {HEAD_DIM}, batch 1, mean over {seeds} '
           'seeds of ||Y - Y_exact|| / ||Y_exact||. "text": q, k, v from a random-init '
           'attention layer on Python source bytes, logits rescaled to standard deviation 2; '
           '"noise": standard normal q, k, v (logit standard deviation 1). '
           'Linformer projections are at their initialisation (untrained). On noise the exact '
           'output averages many unrelated values and is small, so errors relative to it '
           'exceed 1.', '',
           '| input | attention | options | budget | error |', '|---|---|---|---|---|']
  for row in rows:
    options = ', '.join(f'{k}={v}' for k, v in row['options'].items())
    lines.append(f'| {row["input"]} | {row["attention"]} | {options} | {row["budget"]} | '
                 f'{row["error"]:.4f} ± {row["error_std"]:.4f} |')
  with open(out_stem + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')

  figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for axis, kind in zip(axes, ('text', 'noise')):
    for name in sweeps(length):
      points = [(r['budget'], r['error']) for r in rows
                if r['input'] == kind and r['attention'] == name]
      axis.plot(*zip(*points), marker='o', label=name)
    axis.set_xscale('log', base=2)
    axis.set_yscale('log')
    axis.set_xlabel('budget (keys or features per query)')
    axis.set_title(f'{kind} inputs, length {length}')
    axis.grid(True, which='both', alpha=0.3)
  axes[0].set_ylabel('relative error vs exact attention')
  axes[0].legend()
  figure.tight_layout()
  figure.savefig(out_stem + '.png', dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--length', type=int, default=2048)
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--out', default='experiments/results/approximation')
  args = parser.parse_args()
  rows = run(args.length, args.seeds)
  write_results(rows, args.length, args.seeds, args.out)


if __name__ == '__main__':
  main()
