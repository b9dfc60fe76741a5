"""Activation memory of one training step: reversible blocks against ordinary ones, by depth.

  python -m experiments.reversible_memory --length 4096 --layers 1,12

Each case (layers, reversible, ff_chunk_size) runs in a fresh interpreter, which
builds a small Classifier (emb 128, 4 heads, mlp 512, Longformer window 128, so
the attention itself is linear in length; dropout 0.1, batch 1), compiles one
training step (loss, and its gradients w.r.t. every parameter, under jax.jit)
and measures:
- XLA temp: `compiled.memory_analysis().temp_size_in_bytes`, the buffers XLA
  plans for the step beyond its arguments (parameters, batch) and outputs
  (loss, gradients): the activation memory;
- step peak: the peak resident set while the step runs (one warm-up call, then
  `--repeats` timed ones) minus the resident set just before (the helpers of
  `efficient_attn.bench`);
- time: the min wall time of the timed calls (recomputation costs compute).
Writes experiments/results/reversible_memory.md.
"""

import argparse
import json
import pathlib
import subprocess
import sys

from efficient_attn import bench

RESULTS = pathlib.Path(__file__).parent / 'results' / 'reversible_memory.md'
MODEL = dict(vocab_size=256, num_classes=10, emb_dim=128, num_heads=4, mlp_dim=512,
             dropout_rate=0.1, attention_dropout_rate=0.1, attention='longformer',
             attention_options={'window': 128}, pooling='mean')


def run_case(layers: int, reversible: bool, ff_chunk_size: int | None, length: int,
             repeats: int) -> dict:
  """Compiles and runs one training step in this process; returns its memory and time."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from efficient_attn import models

  model = models.make_model('classification', max_len=length, num_layers=layers,
                            reversible=reversible, ff_chunk_size=ff_chunk_size,
                            rngs=nnx.Rngs(0), **MODEL)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  inputs = jax.random.randint(jax.random.key(1), (1, length), 1, MODEL['vocab_size'])
  batch = {'inputs': inputs, 'mask': jnp.ones((1, length), bool), 'targets': jnp.array([3])}

  def loss_fn(params, rest, batch, key):
    logits = nnx.merge(graphdef, params, rest)(batch, deterministic=False, rngs=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()

  args = (params, rest, batch, jax.random.key(2))
  jax.block_until_ready(args)
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(*args).compile()
  stats = compiled.memory_analysis()
  before = bench.status_bytes('VmRSS')
  bench.reset_peak_rss()
  seconds = bench.min_time(lambda: jax.block_until_ready(compiled(*args)), repeats)
  return {'layers': layers, 'reversible': reversible, 'ff_chunk_size': ff_chunk_size,
          'length': length, 'temp_bytes': stats.temp_size_in_bytes,
          'argument_bytes': stats.argument_size_in_bytes,
          'output_bytes': stats.output_size_in_bytes,
          'peak_bytes': bench.status_bytes('VmHWM') - before, 'seconds': seconds}


def run_in_subprocess(case: dict) -> dict:
  """`run_case(**case)` in a fresh interpreter."""
  command = [sys.executable, '-m', 'experiments.reversible_memory', '--case', json.dumps(case)]
  done = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def write_table(rows: list[dict], command: str, info: dict) -> None:
  """The markdown table of `rows`, with each row's ratio to the 1-layer row of its kind."""
  versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items())
  lines = [
      '# Activation memory of a training step: reversible against ordinary blocks', '',
      f'Command: `{command}`', '',
      f'Machine: {info["cpu"]}, {info["cores"]} cores, jax backend {info["backend"]}; '
      f'{versions}.', '',
      'Classifier, emb 128, 4 heads, mlp 512, Longformer window 128, dropout 0.1, batch 1, '
      'float32; one jitted step: loss and gradients w.r.t. every parameter. "XLA temp": '
      'temp buffers of the compiled step (activations; parameters, batch and gradients are '
      'its arguments and outputs, listed apart). "step peak": peak resident set while the '
      'step runs minus the resident set before it. "x 1 layer": over the row with one '
      'layer and the same settings. MB = 1e6 bytes. Each case in its own process.', '',
      '| layers | reversible | ff_chunk_size | length | XLA temp MB | x 1 layer | '
      'args + outputs MB | step peak MB | x 1 layer | step s | x 1 layer |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    one = next(r for r in rows if r['layers'] == min(x['layers'] for x in rows) and
               (r['reversible'], r['ff_chunk_size']) == (row['reversible'],
                                                         row['ff_chunk_size']))
    ratio = lambda key: f'{row[key] / one[key]:.2f}'
    lines.append(
        f'| {row["layers"]} | {"yes" if row["reversible"] else "no"} | '
        f'{row["ff_chunk_size"] or "-"} | {row["length"]} | {row["temp_bytes"] / 1e6:.1f} | '
        f'{ratio("temp_bytes")} | '
        f'{(row["argument_bytes"] + row["output_bytes"]) / 1e6:.1f} | '
        f'{row["peak_bytes"] / 1e6:.1f} | {ratio("peak_bytes")} | {row["seconds"]:.3f} | '
        f'{ratio("seconds")} |')
  RESULTS.parent.mkdir(exist_ok=True)
  RESULTS.write_text('\n'.join(lines) + '\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--length', type=int, default=4096)
  parser.add_argument('--layers', default='1,12', help='comma-separated depths')
  parser.add_argument('--ff_chunk_sizes', default='0,1024',
                      help='comma-separated MLP chunk sizes, 0 for unchunked')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:
    print(json.dumps(run_case(**json.loads(args.case))), flush=True)
    return
  rows = []
  for reversible in (False, True):
    for chunk in (int(x) for x in args.ff_chunk_sizes.split(',')):
      for layers in (int(x) for x in args.layers.split(',')):
        case = dict(layers=layers, reversible=reversible, ff_chunk_size=chunk or None,
                    length=args.length, repeats=args.repeats)
        rows.append(run_in_subprocess(case))
        print(json.dumps(rows[-1]), flush=True)
  write_table(rows, 'python -m experiments.reversible_memory ' +
              ' '.join(sys.argv[1:]), bench.machine_info())


if __name__ == '__main__':
  main()
