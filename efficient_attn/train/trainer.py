"""`train_and_evaluate(config, workdir)`: data -> model -> jitted steps -> checkpoints -> results.

Data-parallel over every device: `parallel='mesh'` (jit, batch split over a 1-D
mesh, parameters replicated) or 'pmap' (the same step under `jax.pmap`, gradients
summed with `lax.psum`). With several processes (`jax.distributed`), each reads its
own shard through `make_batches`; global batches are assembled with
`jax.make_array_from_process_local_data`; only process 0 writes metrics and
results; checkpoints are written by all.

A run resumes from the last checkpoint of its workdir (model, optimizer, step,
random key and data-iterator state), so a killed run loses only the steps since
that checkpoint and ends as an uninterrupted one would. At the end the test split
is evaluated with the checkpoint of the best validation score.
"""

import inspect
import json
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import efficient_attn as ea
from efficient_attn import models
from efficient_attn.data import make_batches, tasks
from efficient_attn.metrics import bits_per_byte
from efficient_attn.train import checkpoints
from efficient_attn.train import steps as steps_lib
from efficient_attn.train import writer as writer_lib

PARALLEL = ('mesh', 'pmap')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_config(config, num_devices: int | None = None) -> None:
  """Raises ValueError naming the key, the value and what is allowed; before any compile."""
  if config.task not in tasks.available_tasks():
    raise ValueError(f'config.task={config.task!r} does not exist; available: '
                     f'{", ".join(tasks.available_tasks())}')
  attention = config.model.attention
  if attention not in ea.available_attentions():
    raise ValueError(f'config.model.attention={attention!r} does not exist; available: '
                     f'{", ".join(ea.available_attentions())}')
  if config.task == 'stdlib_lm' and not ea.attention_class(attention).supports_causal:
    raise ValueError(f'config.model.attention={attention!r} cannot be causal, and task '
                     f"{config.task!r} is causal language modelling; use one of: "
                     + ', '.join(n for n in ea.available_attentions()
                                 if ea.attention_class(n).supports_causal))
  if config.parallel not in PARALLEL:
    raise ValueError(f'config.parallel={config.parallel!r} does not exist; available: '
                     f'{", ".join(PARALLEL)}')
  if config.model.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={config.model.dtype!r} does not exist; available: '
                     f'{", ".join(DTYPES)}')
  for key in ('steps', 'eval_every', 'log_every', 'checkpoint_every', 'keep_checkpoints',
              'grad_accum'):
    if config.train[key] < 1:
      raise ValueError(f'config.train.{key}={config.train[key]} must be positive')
  batch, devices = config.data.batch_size, num_devices or jax.device_count()
  per_step = batch // config.train.grad_accum
  if batch % (devices * config.train.grad_accum) or batch % jax.process_count():
    raise ValueError(
        f'config.data.batch_size={batch} must be divisible by the {devices} devices times '
        f'config.train.grad_accum={config.train.grad_accum} (micro-batch {per_step}), and '
        f'by the {jax.process_count()} processes')


def load_tasks(config) -> dict:
  """The train, valid and test splits; MissingDataError says what to prepare or fetch."""
  load = tasks.TASKS[config.task]
  options = dict(config.task_options)
  if 'prepare_if_missing' in inspect.signature(load).parameters:
    options['prepare_if_missing'] = config.data.prepare_if_missing
  return {split: tasks.get_task(config.task, config.data.data_dir, split,
                                config.data.seq_len, **options)
          for split in ('train', 'valid', 'test')}


def build_model(config, task, rngs: nnx.Rngs):
  """The model of `config.model` for `task`: Classifier, DualEncoder or LanguageModel."""
  m = config.model
  kwargs = dict(
      vocab_size=task.vocab_size, max_len=task.seq_len, num_layers=m.num_layers,
      emb_dim=m.emb_dim, num_heads=m.num_heads, qkv_dim=m.qkv_dim, mlp_dim=m.mlp_dim,
      dropout_rate=m.dropout_rate, attention_dropout_rate=m.attention_dropout_rate,
      attention=m.attention, attention_options=dict(m.attention_options),
      pos_encoding=m.pos_encoding, reversible=m.reversible, ff_chunk_size=m.ff_chunk_size,
      dtype=DTYPES[m.dtype], rngs=rngs)
  kind = models.task_kind_of(task)
  if kind != 'causal_lm':
    kwargs.update(num_classes=task.num_classes, pooling=m.pooling)
  return models.make_model(kind, **kwargs)


def init_state(config, task, axis_name: str | None = None):
  """The step functions and the initial train state of `config` for `task`.

  Args:
    config: a ConfigDict with the keys of `configs/base.py`.
    task: the train split's `Task`.
    axis_name: pmap's axis name; None under jit with a mesh.

  Returns:
    (StepFunctions, TrainState) on the host, before any placement.
  """
  model = build_model(config, task, nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = steps_lib.make_optimizer(config.train)
  state = steps_lib.TrainState(
      step=jnp.int32(0), params=params, rest=rest, opt_state=optimizer.init(params),
      key=jax.random.key_data(jax.random.key(config.seed + 1)))
  fns = steps_lib.StepFunctions(graphdef=graphdef, optimizer=optimizer,
                                causal_lm=task.causal_lm, grad_accum=config.train.grad_accum,
                                axis_name=axis_name)
  return fns, state


class DataParallel:
  """Places state and batches on every device and compiles the steps for `parallel`."""

  def __init__(self, parallel: str, devices=None):
    self.parallel = parallel
    self.devices = list(devices or jax.devices())
    self.mesh = jax.sharding.Mesh(np.array(self.devices), ('data',))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    self.axis_name = 'data' if parallel == 'pmap' else None
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]

  def put_state(self, state):
    """The state replicated on every device (mesh: global arrays; pmap: stacked)."""
    if self.parallel == 'pmap':
      count = len(self.local_devices)
      return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count,) + x.shape), state)
    return jax.device_put(state, self.replicated)

  def saveable_state(self, state):
    """The state as global replicated arrays, as checkpoints hold it."""
    if self.parallel == 'pmap':
      return jax.device_put(jax.tree.map(_first_local, state), self.replicated)
    return state

  def put_batch(self, batch: dict) -> dict:
    """This process's batch as the global batch (mesh) or per-device slices (pmap)."""
    if self.parallel == 'pmap':
      count = len(self.local_devices)
      return jax.tree.map(lambda x: x.reshape((count, -1) + x.shape[1:]), batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

  def compile(self, step_fn, donate: bool):
    """`step_fn(state, batch)` jitted (mesh) or pmapped over the local devices."""
    if self.parallel == 'pmap':
      return jax.pmap(step_fn, axis_name=self.axis_name, devices=self.devices,
                      donate_argnums=(0,) if donate else ())
    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())

  def first(self, tree):
    """Host values of step outputs (pmap outputs are the same on every device)."""
    if self.parallel == 'pmap':
      tree = jax.tree.map(_first_local, tree)
    return jax.device_get(tree)


def _first_local(x) -> np.ndarray:
  """Row 0 of a per-device stack, from this process (a pmap output's x[0] may be on host 0)."""
  return np.asarray(x.addressable_data(0)[0] if isinstance(x, jax.Array) else x[0])


def evaluate(eval_step, parallel: DataParallel, state, task, local_batch: int,
             max_batches: int, causal_lm: bool) -> dict:
  """Metrics of `task` (all of it, or its first `max_batches` batches when > 0)."""
  totals = {'loss': 0.0, 'correct': 0.0, 'weight': 0.0}
  batches = make_batches(task, local_batch, shuffle=False, num_epochs=1,
                         drop_remainder=False, num_threads=0)
  for index, batch in enumerate(batches):
    if max_batches and index >= max_batches:
      break
    sums = parallel.first(eval_step(state, parallel.put_batch(batch)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  weight = max(totals['weight'], 1.0)
  metrics = {'loss': totals['loss'] / weight}
  if causal_lm:
    metrics['bits_per_byte'] = bits_per_byte(totals['loss'], weight)
  else:
    metrics['accuracy'] = totals['correct'] / weight
  return metrics


def score(metrics: dict) -> float:
  """Higher is better: accuracy, or minus bits per byte for language modelling."""
  return metrics['accuracy'] if 'accuracy' in metrics else -metrics['bits_per_byte']


def run_info(config, wall_seconds: float) -> dict:
  """What makes a run reproducible: config, git commit, versions, devices, wall time."""
  import flax, optax, grain  # pylint: disable=g-import-not-at-top,multiple-imports
  root = pathlib.Path(__file__).resolve().parents[2]
  try:
    commit = subprocess.run(['git', '-C', str(root), 'rev-parse', 'HEAD'], capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = 'unknown'
  return {
      'config': config.to_dict(), 'git_commit': commit,
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'flax': flax.__version__, 'optax': optax.__version__,
                   'grain': getattr(grain, '__version__', 'unknown')},
      'devices': [str(d) for d in jax.devices()], 'process_count': jax.process_count(),
      'wall_seconds': wall_seconds}


class Progress:
  """A progress bar on a terminal (step, loss, accuracy, steps/s, ETA); plain lines otherwise."""

  def __init__(self, total: int, start: int, enabled: bool):
    self.enabled = enabled
    self.bar = None
    if enabled and sys.stdout.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm.tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step: int, metrics: dict, steps_per_second: float, total: int) -> None:
    if not self.enabled:
      return
    shown = {k: f'{v:.4f}' for k, v in metrics.items() if k in ('loss', 'accuracy')}
    if self.bar is not None:
      self.bar.set_postfix(shown, refresh=False)
      self.bar.update(step - self.bar.n)
    else:
      eta = (total - step) / max(steps_per_second, 1e-9)
      text = ' '.join(f'{k} {v}' for k, v in shown.items())
      print(f'step {step}/{total} {text} {steps_per_second:.2f} steps/s ETA {eta:.0f} s',
            flush=True)

  def log(self, text: str) -> None:
    if not self.enabled:
      return
    (self.bar.write if self.bar is not None else print)(text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def train_and_evaluate(config, workdir, devices=None) -> dict:
  """Trains `config` in `workdir` (resuming it), evaluates the best checkpoint on test.

  Args:
    config: a ConfigDict with the keys of `configs/base.py`.
    workdir: folder of checkpoints, metrics.jsonl, TensorBoard events, results.json.
    devices: the devices to run on; all of them when None.

  Returns:
    The results dict written to workdir/results.json.
  """
  started = time.time()
  workdir = pathlib.Path(workdir)
  chief = jax.process_index() == 0
  results_path = workdir / 'results.json'
  if results_path.exists():
    results = json.loads(results_path.read_text())
    if chief:
      print(f'{workdir} is finished; stored results: {json.dumps(results["test"])}')
    return results
  devices = list(devices or jax.devices())
  check_config(config, len(devices))
  data = load_tasks(config)
  workdir.mkdir(parents=True, exist_ok=True)
  if chief:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
  train_config = config.train
  causal_lm = data['train'].causal_lm
  local_batch = config.data.batch_size // jax.process_count()

  parallel = DataParallel(config.parallel, devices)
  fns, state = init_state(config, data['train'], parallel.axis_name)
  train_step = parallel.compile(steps_lib.make_train_step(fns), donate=True)
  eval_step = parallel.compile(steps_lib.make_eval_step(fns), donate=False)

  train_batches = make_batches(data['train'], local_batch, seed=config.seed)
  manager = checkpoints.make_manager(workdir / 'checkpoints', train_config.keep_checkpoints)
  state = parallel.put_state(state)
  writer = writer_lib.MetricWriter(workdir, enabled=chief)
  start = 0
  latest = manager.latest_step()
  if latest is not None:
    restored = checkpoints.restore(manager, latest, parallel.saveable_state(state),
                                   train_batches)
    state = parallel.put_state(restored) if config.parallel == 'pmap' else restored
    start = latest
    writer.drop_after(start)
  progress = Progress(train_config.steps, start, enabled=chief)
  if latest is not None:
    progress.log(f'resumed {workdir} from step {start}')

  window_start, window_steps = time.time(), 0
  for step in range(start + 1, train_config.steps + 1):
    state, metrics = train_step(state, parallel.put_batch(next(train_batches)))
    window_steps += 1
    if step % train_config.log_every == 0 or step == train_config.steps:
      metrics = {k: float(v) for k, v in parallel.first(metrics).items()}
      rate = window_steps / max(time.time() - window_start, 1e-9)
      writer.write(step, 'train', {**metrics, 'steps_per_second': rate})
      progress.update(step, metrics, rate, train_config.steps)
      window_start, window_steps = time.time(), 0
    evaluated = step % train_config.eval_every == 0 or step == train_config.steps
    if evaluated:
      valid = evaluate(eval_step, parallel, state, data['valid'], local_batch,
                       train_config.eval_batches, causal_lm)
      writer.write(step, 'valid', valid)
      progress.log(f'step {step}: valid ' + ' '.join(f'{k} {v:.4f}' for k, v in valid.items()))
    if evaluated or step % train_config.checkpoint_every == 0:
      checkpoints.save(manager, step, parallel.saveable_state(state), train_batches,
                       score(valid) if evaluated else None)
  manager.wait_until_finished()
  progress.close()

  best = manager.best_step()
  if best is not None and best != train_config.steps:
    state = checkpoints.restore(manager, best, parallel.saveable_state(state))
    state = parallel.put_state(state) if config.parallel == 'pmap' else state
  test = evaluate(eval_step, parallel, state, data['test'], local_batch, 0, causal_lm)
  writer.write(train_config.steps, 'test', test)
  writer.close()
  manager.close()
  results = {'test': test, 'best_step': best, **run_info(config, time.time() - started)}
  if chief:
    results_path.write_text(json.dumps(results, indent=2) + '\n')
    print(f'test (checkpoint of step {best}): ' +
          ' '.join(f'{k} {v:.4f}' for k, v in test.items()))
  return results
