"""Training speed of every attention on one task config: steps/s and the trainer's overhead.

  python -m experiments.train_speed --config configs/listops.py --scale cpu --steps 20

For each registered attention: the config's model and optimizer, its jitted train
step fed by `make_batches` as in `train_and_evaluate` (data-parallel over every
device); after `--warmup` steps, the wall time of `--steps` steps, and the share
of it spent outside the step (waiting for and placing the next batch). Writes
experiments/results/train_speed.md.
"""

import argparse
import os
import pathlib
import platform
import time

import jax

import efficient_attn as ea
from configs import load_config
from efficient_attn.data import make_batches
from efficient_attn.train import steps as steps_lib
from efficient_attn.train import trainer

RESULTS = pathlib.Path(__file__).parent / 'results' / 'train_speed.md'


def measure(config, task, warmup: int, steps: int) -> dict:
  """Steps/s of the jitted train step and the share of wall time spent outside it."""
  parallel = trainer.DataParallel(config.parallel)
  fns, state = trainer.init_state(config, task, parallel.axis_name)
  train_step = parallel.compile(steps_lib.make_train_step(fns), donate=True)
  state = parallel.put_state(state)
  batches = make_batches(task, config.data.batch_size, seed=config.seed)
  for _ in range(warmup):
    state, metrics = train_step(state, parallel.put_batch(next(batches)))
  jax.block_until_ready(metrics)
  outside = 0.0
  start = time.perf_counter()
  for _ in range(steps):
    before = time.perf_counter()
    batch = parallel.put_batch(next(batches))
    outside += time.perf_counter() - before
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
  wall = time.perf_counter() - start
  return {'steps_per_second': steps / wall, 'outside': outside / wall}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/listops.py')
  parser.add_argument('--scale', default='cpu')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--data_dir', default=None)
  args = parser.parse_args()
  load = os.getloadavg()
  rows = []
  for name in ea.available_attentions():
    config = load_config(args.config, f'{name},{args.scale}')
    if args.data_dir:
      config.data.data_dir = args.data_dir
    trainer.check_config(config)
    task = trainer.load_tasks(config)['train']
    result = measure(config, task, args.warmup, args.steps)
    rows.append((name, dict(config.model.attention_options), result))
    print(name, result, flush=True)
  lines = [
      '# Training speed', '',
      f'Command: `python -m experiments.train_speed --config {args.config} --scale {args.scale} '
      f'--steps {args.steps} --warmup {args.warmup}`. Machine: {platform.machine()}, '
      f'{os.cpu_count()} cores, {jax.device_count()} {jax.default_backend()} device(s), jax '
      f'{jax.__version__}; load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} '
      '(shared machine: compare rows of one run only).', '',
      f'Task {config.task}, scale {args.scale}: {config.model.num_layers} layers, emb '
      f'{config.model.emb_dim}, {config.model.num_heads} heads, seq_len {config.data.seq_len}, '
      f'batch {config.data.batch_size}. Steps timed one by one after {args.warmup} warm-up '
      'steps; "outside" is the share of wall time spent getting and placing the next batch.',
      '', '| attention | options | steps/s | outside the step |', '|---|---|---|---|']
  for name, options, result in rows:
    text = ', '.join(f'{k}={v}' for k, v in options.items()) or '-'
    lines.append(f'| {name} | {text} | {result["steps_per_second"]:.2f} | '
                 f'{100 * result["outside"]:.2f}% |')
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text('\n'.join(lines) + '\n')
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
