"""The trainer end to end at `tiny` scale: learning, data parallelism, checkpoints, bad input.

Killing a run and resuming it is tested in test_distributed.py (two processes, SIGKILL, relaunch)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import listops as listops_config
from configs import lm as lm_config
from configs import retrieval as retrieval_config
from efficient_attn import train
from efficient_attn.data import MissingDataError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(module, arg='full,tiny', data_dir=None, **train_options):
  """A tiny config of a config module, with train keys overridden."""
  config = module.get_config(arg)
  config.data.data_dir = None if data_dir is None else str(data_dir)
  config.train.update(train_options)
  return config


def train_losses(workdir) -> list[float]:
  lines = [json.loads(l) for l in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [l['loss'] for l in lines if l['split'] == 'train']


def write_pairs(root, count=64):
  """Retrieval files whose label is whether the first document starts with x."""
  rng = np.random.default_rng(0)
  folder = root / 'lra_release' / 'tsv_data'
  folder.mkdir(parents=True)
  for name in ('train', 'eval', 'test'):
    lines = []
    for i in range(count):
      a, b = rng.choice([b'x', b'y'], 2)
      text = lambda first: first + bytes(rng.integers(97, 123, 20, dtype=np.uint8))
      lines.append(f'{int(a == b"x")}\tp{i}\tq{i}\t'.encode() + text(a) + b'\t' + text(b) + b'\n')
    (folder / f'new_aan_pairs.{name}.tsv').write_bytes(b''.join(lines))


def write_library(root):
  """A small 'standard library' of repetitive source files for byte-level modelling."""
  for i in range(30):
    (root / f'module_{i}.py').write_text('def f(x):\n  return x + 1\n' * 20)


@pytest.mark.parametrize('family', ['classifier', 'dual_encoder', 'language_model'])
def test_tiny_run_lowers_the_loss(family, prepared_dir, tmp_path):
  if family == 'classifier':
    config = tiny(listops_config, data_dir=prepared_dir)
  elif family == 'dual_encoder':
    write_pairs(tmp_path)
    config = tiny(retrieval_config, data_dir=tmp_path)
  else:
    write_library(tmp_path)
    config = tiny(lm_config)
    config.task_options = {'root': str(tmp_path)}
  # The pair task needs more and larger steps to start learning.
  steps, rate = (50, 1e-2) if family == 'dual_encoder' else (30, 3e-3)
  config.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, learning_rate=rate)
  results = train.train_and_evaluate(config, tmp_path / 'run', devices=jax.devices()[:1])
  losses = train_losses(tmp_path / 'run')
  assert len(losses) == steps
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
  metric = 'bits_per_byte' if family == 'language_model' else 'accuracy'
  assert np.isfinite(results['test'][metric])
  for name in ('metrics.jsonl', 'results.json', 'config.json'):
    assert (tmp_path / 'run' / name).exists()
  assert list((tmp_path / 'run' / 'events').iterdir()), 'TensorBoard events'
  assert results['git_commit'] and results['devices']
  # A finished run is not run again: its stored results come back.
  assert train.train_and_evaluate(config, tmp_path / 'run')['test'] == results['test']


def test_mesh_and_pmap_over_4_devices_equal_one_device(prepared_dir, tmp_path):
  runs = {}
  for name, parallel, devices in (('one', 'mesh', jax.devices()[:1]),
                                  ('mesh', 'mesh', jax.devices()[:4]),
                                  ('pmap', 'pmap', jax.devices()[:4])):
    config = tiny(listops_config, data_dir=prepared_dir, steps=4, eval_every=4,
                  checkpoint_every=4)
    config.parallel = parallel
    results = train.train_and_evaluate(config, tmp_path / name, devices=devices)
    runs[name] = (train_losses(tmp_path / name), results['test']['loss'])
  for name in ('mesh', 'pmap'):
    np.testing.assert_allclose(runs[name][0], runs['one'][0], rtol=1e-5)
    np.testing.assert_allclose(runs[name][1], runs['one'][1], rtol=1e-5)


def launch(workdir, *overrides, config='configs/listops.py:full,tiny', env=None, **kwargs):
  """A launch.py subprocess."""
  command = [sys.executable, str(ROOT / 'launch.py'), f'--config={ROOT / config}',
             f'--workdir={workdir}', *overrides]
  return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_damaged_or_incompatible_checkpoint_is_named(prepared_dir, tmp_path):
  config = tiny(listops_config, data_dir=prepared_dir, steps=3, eval_every=3,
                checkpoint_every=3)
  devices = jax.devices()[:1]
  train.train_and_evaluate(config, tmp_path, devices=devices)
  (tmp_path / 'results.json').unlink()
  bigger = tiny(listops_config, data_dir=prepared_dir, steps=6)
  bigger.model.mlp_dim = 48
  with pytest.raises(train.CheckpointError, match=r'checkpoints/3 holds .*mlp.* of shape'):
    train.train_and_evaluate(bigger, tmp_path, devices=devices)
  for path in (tmp_path / 'checkpoints' / '3' / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 100 and 'metadata' not in path.name.lower():
      path.write_bytes(path.read_bytes()[:40])
  config.train.steps = 6
  with pytest.raises(train.CheckpointError, match='checkpoints/3'):
    train.train_and_evaluate(config, tmp_path, devices=devices)


@pytest.mark.parametrize('change,message', [
    (lambda c: setattr(c.model, 'attention', 'flash'), "attention='flash' does not exist"),
    (lambda c: setattr(c, 'task', 'mnist'), "task='mnist' does not exist"),
    (lambda c: setattr(c, 'parallel', 'fsdp'), "parallel='fsdp' does not exist"),
    (lambda c: setattr(c.data, 'batch_size', 6), 'batch_size=6 must be divisible by the 4'),
    (lambda c: setattr(c.train, 'steps', 0), 'steps=0 must be positive'),
])
def test_bad_config_is_refused_before_compiling(change, message, prepared_dir, tmp_path):
  config = tiny(listops_config, data_dir=prepared_dir)
  change(config)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


def test_non_causal_attention_is_refused_for_language_modelling(tmp_path):
  config = tiny(lm_config, 'linformer,tiny')
  with pytest.raises(ValueError, match="attention='linformer' cannot be causal"):
    train.train_and_evaluate(config, tmp_path)


def test_missing_data_names_what_to_fetch(tmp_path):
  config = tiny(retrieval_config, data_dir=tmp_path)
  with pytest.raises(MissingDataError, match='new_aan_pairs.train.tsv'):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_launch_refuses_unknown_or_mistyped_overrides(tmp_path):
  for override, message in (('--config.train.stepz=3', 'stepz'),
                            ('--config.train.steps=many', 'steps')):
    process = launch(tmp_path, override)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and message in err, err
