"""Data speed: ListOps and Pathfinder generation rates; what the input pipeline adds to a step.

  python experiments/data_speed.py --data_dir /tmp/efficient_attn_data

Writes experiments/results/data_speed.md. Rates are given per wall-clock second
and per CPU second of this process (the second does not depend on other load on
the machine). The pipeline overhead compares the time of a jitted stand-in
training step (a 2-layer transformer-sized forward and backward pass) with the
time the step loop waits for batches from `make_batches`, and with the cost of a
batch made without read-ahead.
"""

import argparse
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.data import generated, get_task, listops, make_batches, pathfinder

RESULTS = pathlib.Path(__file__).parent / 'results' / 'data_speed.md'


def timed(fn, repeats: int):
  """(result, wall seconds, CPU seconds) of the fastest of `repeats` calls of `fn`."""
  best = None
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if best is None or wall < best[1]:
      best = (result, wall, cpu)
  return best


def listops_rate(repeats: int = 2) -> str:
  """Generates the paper-setting ListOps splits (100K examples)."""
  setting = listops.SETTINGS['lra']
  splits, wall, cpu = timed(lambda: listops.generate_splits(setting), repeats)
  count = sum(len(tokens) for tokens, _ in splits.values())
  return f'| ListOps (lra), {count} examples | {wall:.1f} s | {cpu:.1f} s |'


def pathfinder_rate(resolution: int, count: int, repeats: int = 3) -> str:
  """Generates `count` hard Pathfinder images."""
  setting = pathfinder.make_setting(resolution, 'hard')
  _, wall, cpu = timed(lambda: pathfinder.generate(count, setting, seed=0), repeats)
  return (f'| Pathfinder-{resolution} (hard), {count} images | {count / wall:.0f} images/s '
          f'| {count / cpu:.0f} images/s |')


def stand_in_step(vocab: int, width: int = 128):
  """A jitted forward+backward of a 2-layer transformer-sized computation on a batch."""
  keys = jax.random.split(jax.random.key(0), 8)
  params = {
      'embed': jax.random.normal(keys[0], (vocab, width)) * 0.02,
      'layers': [{
          'qkv': jax.random.normal(keys[1 + 3 * i], (width, 3 * width)) * 0.05,
          'mlp_in': jax.random.normal(keys[2 + 3 * i], (width, 4 * width)) * 0.05,
          'mlp_out': jax.random.normal(keys[3 + 3 * i], (4 * width, width)) * 0.05,
      } for i in range(2)],
  }

  def loss(params, inputs, mask):
    x = params['embed'][inputs]
    for layer in params['layers']:
      q, k, v = jnp.split(x @ layer['qkv'], 3, axis=-1)
      logits = jnp.einsum('bqd,bkd->bqk', q, k) / np.sqrt(width)
      logits = jnp.where(mask[:, None, :], logits, -1e9)
      x = x + jax.nn.softmax(logits) @ v
      x = x + jax.nn.gelu(x @ layer['mlp_in']) @ layer['mlp_out']
    return jnp.mean(x ** 2)

  grad = jax.jit(jax.grad(loss))

  def step(batch):
    inputs = batch['inputs1'] if 'inputs1' in batch else batch['inputs']
    mask = batch['mask1'] if 'mask1' in batch else batch['mask']
    return jax.block_until_ready(grad(params, inputs, mask))

  return step


def pipeline_overhead(task, batch_size: int, steps: int = 12) -> str:
  """What feeding a jitted stand-in step from the pipeline costs, relative to the step.

  Two measures: the median time the step loop waits in `next()` (the pipeline
  reads ahead in threads), and the cost of making a batch with no read-ahead at
  all (wall clock in the loop's own thread), the most it could add.
  """
  step = stand_in_step(task.vocab_size)
  batches = make_batches(task, batch_size, seed=0, shard_index=0, shard_count=1)
  step(next(batches))
  waits, step_times = [], []
  for _ in range(steps):
    start = time.perf_counter()
    batch = next(batches)
    fetched = time.perf_counter()
    step(batch)
    waits.append(fetched - start)
    step_times.append(time.perf_counter() - fetched)
  unprefetched = make_batches(task, batch_size, seed=1, shard_index=0, shard_count=1,
                              num_threads=0, prefetch=0)
  next(unprefetched)
  start = time.perf_counter()
  for _ in range(steps):
    next(unprefetched)
  batch_cost = (time.perf_counter() - start) / steps
  step_ms, wait_ms = 1e3 * statistics.median(step_times), 1e3 * statistics.median(waits)
  return (f'| {task.name} ({task.seq_len} tokens, batch {batch_size}) | {step_ms:.0f} ms '
          f'| {wait_ms:.2f} ms ({100 * wait_ms / step_ms:.2f}%) '
          f'| {1e3 * batch_cost:.1f} ms ({100e3 * batch_cost / step_ms:.1f}%) |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='/tmp/efficient_attn_data')
  parser.add_argument('--pathfinder_images', type=int, default=8192)
  args = parser.parse_args()
  generated.prepare('listops', 'small', args.data_dir)
  generated.prepare('pathfinder', 'tiny', args.data_dir)
  rows = [
      '# Data speed', '',
      f'Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other work while '
      'measured. Command: `python experiments/data_speed.py`.', '',
      'Generation, fastest of 2 (ListOps) or 3 (Pathfinder) runs:', '',
      '| generation | wall clock | CPU time of this process |', '|---|---|---|',
      listops_rate,
      lambda: pathfinder_rate(32, args.pathfinder_images),
      lambda: pathfinder_rate(128, args.pathfinder_images // 8), '',
      'Stand-in training step (jitted 2-layer transformer-sized forward+backward, width 128) '
      'fed by `make_batches`: median step time, median wait for the next batch, and the cost '
      'of one batch made without read-ahead (the most the pipeline could add):', '',
      '| task | step | wait in next() | batch without read-ahead |', '|---|---|---|---|',
      lambda: pipeline_overhead(get_task('listops', args.data_dir, config='small'), 32),
      lambda: pipeline_overhead(get_task('pathfinder', args.data_dir, config='tiny'), 32),
      lambda: pipeline_overhead(get_task('stdlib_lm', seq_len=512), 32),
  ]
  lines = []
  for row in rows:
    lines.append(row() if callable(row) else row)
    print(lines[-1], flush=True)
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
