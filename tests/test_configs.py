"""Every task config with every attention at `tiny` scale: a model and a train step."""

import importlib

import jax
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn import train
from efficient_attn.data import common
from efficient_attn.data import pipeline
from efficient_attn.train import steps as steps_lib
from efficient_attn.train import trainer

CONFIG_FILES = ('listops', 'text', 'retrieval', 'image', 'pathfinder', 'lm')


def fake_task(config) -> common.Task:
  """A train split of `config.task` with made-up examples of the task's kind (no data)."""
  seq_len = config.data.seq_len
  tokens = np.arange(1, seq_len // 2 + 1, dtype=np.int32) % 15 + 1
  if config.task == 'stdlib_lm':
    example, kind = {'inputs': tokens, 'targets': tokens}, {'causal_lm': True}
  elif config.task == 'retrieval':
    example, kind = {'inputs1': tokens, 'inputs2': tokens, 'targets': 1}, {'pair': True}
  else:
    example, kind = {'inputs': tokens, 'targets': 1}, {}
  return common.Task(name=config.task, split='train', source=[example] * 64,
                     vocab_size=common.BYTE_VOCAB_SIZE, num_classes=10, seq_len=seq_len,
                     **kind)


def tiny_config(name, attention):
  return importlib.import_module(f'configs.{name}').get_config(f'{attention},tiny')


def build_state(config, task, compiled: bool):
  """(step functions, initial train state); abstract shapes unless `compiled`."""
  made = {}

  def init():
    made['fns'], state = trainer.init_state(config, task)
    return state

  # eval_shape traces the initialization without compiling it.
  state = init() if compiled else jax.eval_shape(init)
  return made['fns'], state


# Every task runs two real steps with full attention; the other pairs are
# traced (eval_shape: the same shapes and options, forward and backward,
# without a compilation each; tests/test_models.py runs every attention inside
# the model).
@pytest.mark.parametrize('attention', ea.available_attentions())
@pytest.mark.parametrize('name', CONFIG_FILES)
def test_tiny_config_builds_and_runs_a_train_step(name, attention):
  config = tiny_config(name, attention)
  task = fake_task(config)
  if task.causal_lm and not ea.attention_class(attention).supports_causal:
    with pytest.raises(ValueError, match=f'attention={attention!r} cannot be causal'):
      train.check_config(config, num_devices=1)
    return
  train.check_config(config, num_devices=1)
  compiled = attention == 'full'
  fns, state = build_state(config, task, compiled)
  batch = pipeline.read_batch(task, np.arange(config.data.batch_size))
  step = steps_lib.make_train_step(fns)
  new_state, metrics = jax.jit(step)(state, batch) if compiled else jax.eval_shape(
      step, state, batch)
  if compiled:  # the warmup's first step has learning rate 0
    new_state, metrics = jax.jit(step)(new_state, batch)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(new_state) == shapes(state)
  assert set(metrics) == {'loss', 'accuracy', 'grad_norm'}
  assert all(m.shape == () for m in metrics.values())
  if compiled:
    assert np.isfinite(metrics['loss']) and float(metrics['grad_norm']) > 0
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, new_state.params)
    assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_docstring_gives_the_launch_command(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'python launch.py --config configs/{name}.py:' in module.__doc__


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_bad_scale_is_refused_by_name(name):
  with pytest.raises(ValueError, match="scale 'huge' does not exist"):
    importlib.import_module(f'configs.{name}').get_config('full,huge')


def test_bad_pathfinder_resolution_is_refused_by_name():
  from configs import pathfinder  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='resolution 48 does not exist'):
    pathfinder.get_config('full,tiny,48')


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_linformer_length_covers_a_cls_token(name):
  for scale in ('tiny', 'cpu', 'paper'):
    config = importlib.import_module(f'configs.{name}').get_config(f'linformer,{scale}')
    cls = config.model.pooling == 'cls'
    assert config.model.attention_options.max_len == config.data.seq_len + cls, scale


def test_paper_scale_takes_the_lra_attention_settings():
  from configs import base, listops
  for attention, options in base.LRA_ATTENTION.items():
    got = listops.get_config(f'{attention},paper').model.attention_options
    assert {k: got[k] for k in options} == options
  cpu = listops.get_config('longformer,cpu').model.attention_options
  assert cpu.max_global == 1 and not cpu.check_global_count and cpu.window == 64
