"""Data speed: ListOps and Pathfinder generation rates; what the input pipeline adds to a step.

  git show COMMIT:efficient_attn/data/pipeline.py > /tmp/old_pipeline.py  # an older version
  python -m experiments.data_speed --compare_with /tmp/old_pipeline.py

Writes experiments/results/data_speed.md. Rates are given per wall-clock second
and per CPU second of this process (the second does not depend on other load on
the machine). The pipeline overhead is the cost of a 64-example batch made with
no read-ahead minus the cost of decoding its examples, for this pipeline and,
with --compare_with, a reference one timed alternately in the same process; and
the time a loop of jitted stand-in training steps (a 2-layer transformer-sized
forward and backward pass) waits for batches from `make_batches` with read-ahead.
"""

import argparse
import importlib.util
import os
import pathlib
import platform
import statistics
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.data import generated, get_task, listops, make_batches, pathfinder, pipeline

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


def load_pipeline(path: str):
  """The pipeline module in the file `path` (e.g. an older pipeline.py), to time beside this one."""
  spec = importlib.util.spec_from_file_location('reference_pipeline', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def batch_costs(task, pipelines: dict, batch_size: int = 64, batches: int = 16,
                repeats: int = 5) -> str:
  """Per-batch time of each pipeline with no read-ahead, beside decoding alone.

  Decoding is one batched read of `batch_size` random examples of the source (TFDS
  decoding and the task's own conversion), also timed one example at a time. The
  pipelines are timed alternately, `batches` batches at a time, and each figure is
  the fastest of `repeats`.
  """
  iterators = {name: module.make_batches(task, batch_size, seed=0, shard_index=0, shard_count=1,
                                          num_threads=0, prefetch=0)
               for name, module in pipelines.items()}
  best = dict.fromkeys(['decode', 'one by one', *iterators], float('inf'))
  rng = np.random.default_rng(0)
  for iterator in iterators.values():
    next(iterator)
  for _ in range(repeats):
    reads = [rng.integers(len(task.source), size=batch_size).tolist() for _ in range(batches)]
    start = time.perf_counter()
    for indices in reads:
      pipeline.read_many(task.source, indices)
    best['decode'] = min(best['decode'], (time.perf_counter() - start) / batches)
    start = time.perf_counter()
    for indices in reads:
      [task.source[i] for i in indices]  # pylint: disable=expression-not-assigned
    best['one by one'] = min(best['one by one'], (time.perf_counter() - start) / batches)
    for name, iterator in iterators.items():
      start = time.perf_counter()
      for _ in range(batches):
        next(iterator)
      best[name] = min(best[name], (time.perf_counter() - start) / batches)
  decode, one_by_one = best.pop('decode'), best.pop('one by one')
  cells = [f'{1e3 * cost:.2f} ms ({1e3 * (cost - decode):+.2f} ms)' for cost in best.values()]
  return (f'| {task.name} ({len(task.source)} examples, {task.seq_len} tokens) '
          f'| {1e3 * decode:.2f} ms | {1e3 * one_by_one:.2f} ms | {" | ".join(cells)} |')


def shuffle_cost(num_examples: int, batch_size: int = 64, batches: int = 16,
                 repeats: int = 5) -> str:
  """Per-batch time of grain's index order (range, repeat, batch) with and without `shuffle`."""
  orders = {shuffled: grain.MapDataset.range(num_examples) for shuffled in (True, False)}
  orders[True] = orders[True].shuffle(seed=0)
  orders = {key: order.repeat(None).batch(batch_size) for key, order in orders.items()}
  best = dict.fromkeys(orders, float('inf'))
  for round_ in range(repeats):
    for key, order in orders.items():
      start = time.perf_counter()
      for index in range(round_ * batches, (round_ + 1) * batches):
        order[index]  # pylint: disable=pointless-statement
      best[key] = min(best[key], (time.perf_counter() - start) / batches)
  return (f'| {num_examples} | {1e3 * best[True]:.2f} ms | {1e3 * best[False]:.2f} ms '
          f'| {1e6 * (best[True] - best[False]) / batch_size:.1f} us |')


def pipeline_overhead(task, batch_size: int = 32, steps: int = 3) -> str:
  """The median time a loop of jitted stand-in steps waits in `next()` (read-ahead threads)."""
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
  step_ms, wait_ms = 1e3 * statistics.median(step_times), 1e3 * statistics.median(waits)
  return (f'| {task.name} ({task.seq_len} tokens, batch {batch_size}) | {step_ms:.0f} ms '
          f'| {wait_ms:.2f} ms ({100 * wait_ms / step_ms:.2f}%) |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default='/tmp/efficient_attn_data')
  parser.add_argument('--pathfinder_images', type=int, default=8192)
  parser.add_argument('--compare_with', default=None,
                      help='a pipeline.py (e.g. an older one, copied outside the repository) '
                      'whose make_batches is timed beside this one')
  parser.add_argument('--skip_generation', action='store_true')
  args = parser.parse_args()
  generated.prepare('listops', 'small', args.data_dir)
  generated.prepare('pathfinder', 'tiny', args.data_dir)
  pipelines = {'this pipeline': pipeline}
  if args.compare_with:
    pipelines = {args.compare_with: load_pipeline(args.compare_with), **pipelines}
  tasks = [lambda: get_task('listops', args.data_dir, config='small'),
           lambda: get_task('pathfinder', args.data_dir, config='tiny'),
           lambda: get_task('stdlib_lm', seq_len=512)]
  command = ' '.join(['python -m experiments.data_speed', *sys.argv[1:]])
  rows = [
      '# Data speed', '',
      f'Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other work while '
      f'measured (`uptime` before: {uptime()}). Command: `{command}`.', '',
  ]
  if not args.skip_generation:
    rows += [
        'Generation, fastest of 2 (ListOps) or 3 (Pathfinder) runs:', '',
        '| generation | wall clock | CPU time of this process |', '|---|---|---|',
        listops_rate,
        lambda: pathfinder_rate(32, args.pathfinder_images),
        lambda: pathfinder_rate(128, args.pathfinder_images // 8), '']
  rows += [
      'Cost of one 64-example batch made without read-ahead (in the loop\'s own thread), '
      'against decoding alone (one batched read of 64 random examples, and the same read one '
      'example at a time); in brackets what the pipeline adds to the batched read. Fastest '
      'of 5 rounds of 16 batches, the pipelines alternating:', '',
      f'| task | decoding | one by one | {" | ".join(pipelines)} |',
      '|---|---|---|' + '---|' * len(pipelines),
      *[lambda task=task: batch_costs(task(), pipelines) for task in tasks], '',
      'What grain\'s `shuffle` costs: one batch of 64 indices of a shard of N examples '
      'through grain\'s range, repeat and batch, with and without shuffle (fastest of 5 '
      'rounds of 16 batches):', '',
      '| N | with shuffle | without | shuffle per index |', '|---|---|---|---|',
      *[lambda n=n: shuffle_cost(n) for n in (256, 2000, 24000, 96000)], '',
      'Stand-in training step (jitted 2-layer transformer-sized forward+backward, width 128) '
      'fed by `make_batches` with read-ahead: median step time and median wait for the next '
      'batch, of 3 steps:', '',
      '| task | step | wait in next() |', '|---|---|---|',
      *[lambda task=task: pipeline_overhead(task()) for task in tasks],
  ]
  lines = []
  for row in rows:
    lines.append(row() if callable(row) else row)
    print(lines[-1], flush=True)
  lines += ['', f'`uptime` after: {uptime()}.']
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text('\n'.join(lines) + '\n')


def uptime() -> str:
  """The load averages of the machine over the last 1, 5 and 15 minutes."""
  return 'load average ' + ', '.join(f'{load:.2f}' for load in os.getloadavg())


if __name__ == '__main__':
  main()
