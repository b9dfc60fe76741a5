"""Two processes on 127.0.0.1 (CPU collectives over gloo) train as one: lockstep, resume.

The reference is one process with two devices reading, per step, the two shards
that the two processes read (`TwoShards`), so both see the same global batches.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np

from configs import listops as listops_config
from efficient_attn import train
from efficient_attn.data import make_batches
from efficient_attn.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
OVERRIDES = {'steps': STEPS, 'eval_every': 6, 'checkpoint_every': 3, 'log_every': 1}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch_two(workdir, data_dir, cache_dir, *flags) -> list[subprocess.Popen]:
  """launch.py with `flags` as processes 0 and 1 of a run, one CPU device each."""
  port = free_port()
  # conftest's flags (no LLVM optimisation), with one device per process.
  xla_flags = re.sub(r'device_count=\d+', 'device_count=1', os.environ['XLA_FLAGS'])
  env = {**os.environ, 'XLA_FLAGS': xla_flags,
         'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  command = [sys.executable, str(ROOT / 'launch.py'),
             f'--config={ROOT / "configs/listops.py"}:full,tiny', f'--workdir={workdir}',
             f'--config.data.data_dir={data_dir}', f'--coordinator=127.0.0.1:{port}',
             '--num_processes=2', *flags]
  command += [f'--config.train.{key}={value}' for key, value in OVERRIDES.items()]
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  processes = []
  for i in (0, 1):
    with open(pathlib.Path(workdir) / f'log{i}.txt', 'a') as log:
      processes.append(subprocess.Popen(command + [f'--process_id={i}'], cwd=ROOT, env=env,
                                        stdout=log, stderr=subprocess.STDOUT))
  return processes


def wait_all(processes, workdir) -> None:
  for i, process in enumerate(processes):
    assert process.wait(timeout=300) == 0, (pathlib.Path(workdir) / f'log{i}.txt').read_text()


def metrics(workdir, split) -> list[dict]:
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines if json.loads(line)['split'] == split]


class TwoShards(grain.DatasetIterator):
  """What two processes read, as one batch: shard 0's rows, then shard 1's."""

  def __init__(self, task, batch_size, **options):
    super().__init__([make_batches(task, batch_size // 2, shard_index=i, shard_count=2,
                                   **options) for i in (0, 1)])

  def __next__(self):
    batches = [next(shard) for shard in self._parents]
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

  def get_state(self):
    return {'shards': [shard.get_state() for shard in self._parents]}

  def set_state(self, state):
    for shard, shard_state in zip(self._parents, state['shards']):
      shard.set_state(shard_state)


def test_two_processes_train_as_one_and_resume_after_sigkill(prepared_dir, tmp_path,
                                                             monkeypatch):
  config = listops_config.get_config('full,tiny')
  config.data.data_dir = str(prepared_dir)
  config.train.update(OVERRIDES)
  monkeypatch.setattr(trainer, 'make_batches', TwoShards)  # train and evaluation batches
  one = train.train_and_evaluate(config, tmp_path / 'one', devices=jax.devices()[:2])

  workdir = tmp_path / 'two'
  processes = launch_two(workdir, prepared_dir, tmp_path / 'cache')
  checkpoint = workdir / 'checkpoints' / '3'
  deadline = time.time() + 300
  while (not checkpoint.exists() and time.time() < deadline
         and all(p.poll() is None for p in processes)):
    time.sleep(0.02)
  for process in processes:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert checkpoint.exists()
  assert not (workdir / 'results.json').exists(), 'killed before the end'
  # Checkpoints hold global arrays whatever the parallel mode: resume under pmap.
  wait_all(launch_two(workdir, prepared_dir, tmp_path / 'cache', '--config.parallel=pmap'),
           workdir)
  assert 'resumed' in (workdir / 'log0.txt').read_text()

  two = json.loads((workdir / 'results.json').read_text())
  assert two['process_count'] == 2 and len(two['devices']) == 2
  for split, key in (('train', 'loss'), ('train', 'grad_norm'), ('valid', 'loss')):
    got = [(m['step'], m[key]) for m in metrics(workdir, split)]
    want = [(m['step'], m[key]) for m in metrics(tmp_path / 'one', split)]
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)
  assert two['best_step'] == one['best_step']
  for key in one['test']:
    np.testing.assert_allclose(two['test'][key], one['test'][key], rtol=1e-5)
  # Only process 0 writes metrics and results; iterator states: one file per process.
  assert 'test (checkpoint' in (workdir / 'log0.txt').read_text()
  assert 'step ' not in (workdir / 'log1.txt').read_text()
  data = workdir / 'checkpoints' / str(STEPS) / 'data'
  assert sorted(p.name for p in data.glob('process_*')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
