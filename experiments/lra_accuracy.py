"""Long Range Arena accuracy (Table 1): every attention on every task and seed, beside the paper.

  python -m experiments.lra_accuracy --scale cpu --tasks listops,pathfinder32 --attention all \
      --seeds 3 --seeds_others 1 [--jobs 1] [--runs_dir runs/lra] [--override train.steps=300]
  python -m experiments.lra_accuracy --scale paper --tasks all --dry-run   # commands, estimates

Tasks: listops, text, retrieval, image, pathfinder32 (configs/pathfinder.py at 32 px)
and pathx (at 128 px). Each run is one process, `python launch.py --config
configs/<task>.py:<attention>,<scale> --workdir <runs_dir>/<scale>/<task>/<attention>/seed<k>
--config.seed=<k>` (plus the overrides), at most --jobs at once, its output appended
to <workdir>/launch.log. A workdir holding results.json is collected, not rerun; any
other is launched, and launch.py resumes it from its last checkpoint; a workdir of
another config (e.g. other overrides) is reported as stale and left alone. A run
that fails, times out or is killed (out of memory) is reported as such with the
last lines of its log (kept in <workdir>/error.txt), never as a number. The design
card's mechanisms (CARD) get --seeds seeds, the other LRA models --seeds_others.
Generated data (ListOps, Pathfinder) are prepared once before the runs; tasks whose
data need a download are listed with what provides them. --dry-run prints each
run's state and estimated time (`estimate_seconds`). Writes
experiments/results/lra_accuracy_<scale>.{md,json}.
"""

import argparse
import ast
import concurrent.futures
import dataclasses
import json
import math
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

from configs import load_config
import efficient_attn as ea
from efficient_attn import bench
from efficient_attn.data import MissingDataError
from efficient_attn.train import trainer
from efficient_attn.train import writer

ROOT = pathlib.Path(__file__).resolve().parents[1]
# launch.py under this interpreter, run from the repository root.
LAUNCH = (sys.executable, 'launch.py')
# Task name -> (config file, the config argument after 'attention,scale').
TASKS = {
    'listops': ('configs/listops.py', ''),
    'text': ('configs/text.py', ''),
    'retrieval': ('configs/retrieval.py', ''),
    'image': ('configs/image.py', ''),
    'pathfinder32': ('configs/pathfinder.py', ',32'),
    'pathx': ('configs/pathfinder.py', ',128'),
}
# Tasks whose data are generated here (the others need downloads).
GENERATED = ('listops', 'pathfinder32', 'pathx')
TITLES = {'listops': 'ListOps', 'text': 'Text', 'retrieval': 'Retrieval', 'image': 'Image',
          'pathfinder32': 'Pathfinder', 'pathx': 'Path-X'}
# The eleven models of LRA Table 1, in its order, and their test accuracy (%) there
# (Tay et al. 2020) on ListOps, Text, Retrieval, Image, Pathfinder; on Path-X every
# model failed (chance).
PAPER_TASKS = ('listops', 'text', 'retrieval', 'image', 'pathfinder32')
PAPER = {
    'full': ('Transformer', (36.37, 64.27, 57.46, 42.44, 71.40)),
    'local': ('Local Attention', (15.82, 52.98, 53.39, 41.46, 66.63)),
    'sparse': ('Sparse Trans.', (17.07, 63.58, 59.59, 44.24, 71.71)),
    'longformer': ('Longformer', (35.63, 62.85, 56.89, 42.22, 69.71)),
    'linformer': ('Linformer', (35.70, 53.94, 52.27, 38.56, 76.34)),
    'lsh': ('Reformer', (37.27, 56.10, 53.40, 38.07, 68.50)),
    'sinkhorn': ('Sinkhorn Trans.', (33.67, 61.20, 53.83, 41.23, 67.45)),
    'synthesizer': ('Synthesizer', (36.99, 61.68, 54.67, 41.61, 69.45)),
    'bigbird': ('BigBird', (36.05, 64.02, 59.29, 40.83, 74.87)),
    'linear': ('Linear Trans.', (16.13, 65.90, 53.09, 42.34, 75.30)),
    'performer': ('Performer', (18.01, 65.40, 53.82, 42.77, 77.05)),
}
# The five mechanisms of the design card: --seeds seeds each.
CARD = ('full', 'lsh', 'linformer', 'performer', 'longformer')
# Rough time model of a run without measurements (dry runs): start-up, data,
# compilation and test evaluation, plus the FLOPs of `step_flops` at an effective
# rate. This CPU's rate is calibrated on the one measured cpu-scale run
# (configs/listops.py: full attention, 600 steps in 8.5 min, 5.8 TFLOP: 11 GFLOP/s).
RUN_OVERHEAD_S = 30.0
CPU_FLOPS = 10e9
# One accelerator at `paper` scale: an A100's 156 TFLOP/s (TF32, JAX's default
# float32 matmul precision there) at 30% utilisation.
ACCELERATOR_FLOPS = 156e12
UTILISATION = 0.3
LOG_LINES = 15


def shown(command) -> str:
  """A command starting with this interpreter, as a user types it ('python ...')."""
  return shlex.join(('python', *command[1:]))


@dataclasses.dataclass(frozen=True)
class Run:
  """One (task, attention, seed) training run; `workdir` as launch.py gets it."""
  task: str
  attention: str
  seed: int
  workdir: pathlib.Path
  command: tuple[str, ...]
  config: dict  # as launch.py will see it, JSON-normalised

  @property
  def folder(self) -> pathlib.Path:
    """The workdir from here (a relative one is under the repository root)."""
    return ROOT / self.workdir

  def shown(self) -> str:
    """The command as a user types it."""
    return shown(self.command)


def parse_names(value: str, allowed: tuple[str, ...], everything: tuple[str, ...],
                argument: str) -> list[str]:
  """The comma-separated names of `value` ('all': `everything`); ValueError for unknown ones."""
  names = list(everything) if value == 'all' else [v.strip() for v in value.split(',') if v]
  for name in names:
    if name not in allowed:
      raise ValueError(f'{argument}: {name!r} does not exist; available: all, '
                       f'{", ".join(allowed)}')
  if not names:
    raise ValueError(f'{argument}: {value!r} names nothing; available: all, {", ".join(allowed)}')
  return names


def parse_override(text: str) -> tuple[str, str]:
  """('train.steps', '100') of '--override train.steps=100'."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise ValueError(f"--override {text!r} must be 'key=value', e.g. 'train.steps=100'")
  return key.strip(), value.strip()


def apply_override(config, key: str, value: str) -> None:
  """Sets config[key] to value (a Python literal, else a string); ValueError for unknown keys."""
  *parents, leaf = key.split('.')
  node = config
  for name in parents:
    if name not in node:
      raise ValueError(f'--override {key}: no key {name!r} in the config; available: '
                       f'{", ".join(node)}')
    node = node[name]
  if leaf not in node:
    raise ValueError(f'--override {key}: no key {leaf!r} in the config; available: '
                     f'{", ".join(node)}')
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  try:
    node[leaf] = parsed
  except TypeError as error:
    raise ValueError(f'--override {key}={value}: {error}') from error


def task_config(task: str, attention: str, scale: str, overrides: list[tuple[str, str]]):
  """The config of `task` for `attention` at `scale`, with the overrides applied."""
  path, extra = TASKS[task]
  config = load_config(str(ROOT / path), f'{attention},{scale}{extra}')
  for key, value in overrides:
    apply_override(config, key, value)
  return config


def make_run(task: str, attention: str, seed: int, scale: str, runs_dir: pathlib.Path,
             overrides: list[tuple[str, str]], config) -> Run:
  """The run of `attention` on `task` with `seed`: its workdir and launch.py command.

  A relative `runs_dir` is taken from the repository root, where launch.py runs.
  """
  path, extra = TASKS[task]
  workdir = runs_dir / scale / task / attention / f'seed{seed}'
  command = (*LAUNCH, f'--config={path}:{attention},{scale}{extra}', f'--workdir={workdir}',
             f'--config.seed={seed}', *(f'--config.{k}={v}' for k, v in overrides))
  return Run(task, attention, seed, workdir, command, json.loads(json.dumps(config.to_dict())))


def load_data(task: str, config, prepare: bool):
  """(splits, None) of a task's config, or (None, what provides the data) when absent.

  Args:
    task: a key of TASKS.
    config: its config.
    prepare: generate the data of a GENERATED task now if they are not there.

  Returns:
    The `trainer.load_tasks` dict, or None and a message naming the command or
    download that provides the data.
  """
  config = config.copy_and_resolve_references()
  # Generated data are prepared here, once, rather than in concurrent runs.
  config.data.prepare_if_missing = prepare and task in GENERATED
  try:
    return trainer.load_tasks(config), None
  except MissingDataError as error:
    if task in GENERATED:
      return None, f'not prepared yet; generated before the runs ({error})'
    return None, f'missing: {error} (see `python -m efficient_attn.data.prepare status`)'


def majority_class(task) -> dict:
  """The most frequent label of a split and its share of the examples."""
  counts = np.bincount([int(task.source[i]['targets']) for i in range(len(task.source))])
  return {'label': int(np.argmax(counts)), 'rate': float(counts.max() / counts.sum()),
          'examples': int(counts.sum())}


def latest_step(workdir: pathlib.Path) -> int:
  """The step of the workdir's last checkpoint; 0 when it has none."""
  folder = workdir / 'checkpoints'
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return max(steps, default=0)


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'train.steps': 600, ...} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_change(run: Run) -> str | None:
  """How the config stored in the workdir differs from the planned one; None if it does not."""
  results_path, config_path = run.folder / 'results.json', run.folder / 'config.json'
  stored = None
  if results_path.exists():
    stored = json.loads(results_path.read_text()).get('config')
  elif config_path.exists():
    stored = json.loads(config_path.read_text())
  if stored is None:
    return None
  stored, planned = flatten(stored), flatten(run.config)
  changed = [f'{key}={stored.get(key)!r} (planned {planned.get(key)!r})'
             for key in sorted(set(stored) | set(planned)) if stored.get(key) != planned.get(key)]
  return ', '.join(changed) or None


def needs_launch(run: Run) -> bool:
  """Whether the run has no results yet and its workdir (if any) is of the planned config."""
  return not (run.folder / 'results.json').exists() and not config_change(run)


def run_state(run: Run) -> str:
  """'done' (results.json), 'resumable from step N' (checkpoints) or 'new', and a failure.

  A workdir of another config is 'stale': it is neither collected nor relaunched.
  """
  change = config_change(run)
  if change:
    return f'stale: its config has {change}; move {run.workdir} away to rerun it'
  if (run.folder / 'results.json').exists():
    return 'done'
  step = latest_step(run.folder)
  state = f'resumable from step {step}' if step else 'new'
  error_path = run.folder / 'error.txt'
  if error_path.exists():
    state += f' (last attempt: {error_path.read_text().splitlines()[0]})'
  return state


def keys_per_query(attention: str, options: dict, length: int, head_dim: int) -> float:
  """Keys (or features) each query's scores and weighted sum pay for, roughly, by mechanism."""
  budgets = {
      'local': lambda o: o['block_len'],
      # Its own block plus the summary keys of every block (c = l / 4 unless set).
      'sparse': lambda o: o['block_len'] + length / o['block_len'] * o.get(
          'summary_len', o['block_len'] // 4),
      'longformer': lambda o: 2 * o['window'] + 1,
      'linformer': lambda o: o['k'],
      'lsh': lambda o: 2 * o['n_hashes'] * o['chunk_len'],
      'performer': lambda o: o['num_features'],
      'linear': lambda o: head_dim,
      # Three window blocks, two global ones and the random ones.
      'bigbird': lambda o: (5 + o['num_random_blocks']) * o['block_len'],
      'sinkhorn': lambda o: 2 * o['block_len'],
      'routing': lambda o: length / o['num_clusters'],
  }
  return min(length, budgets[attention](options)) if attention in budgets else length


def step_flops(config) -> float:
  """FLOPs of one training step, counted from the model sizes.

  Per layer and token: the q/k/v and output projections (2 * 4 * emb * qkv), the
  MLP (2 * 2 * emb * mlp) and the attention scores and weighted sum (2 * 2 * keys *
  qkv, keys from `keys_per_query`); backward twice forward. Embedding, head and the
  mechanisms' own extra work (sorting, hashing, projections) are left out.
  """
  m = config.model
  length = config.data.seq_len + (m.pooling == 'cls')
  tokens = config.data.batch_size * length * (2 if config.task == 'retrieval' else 1)
  keys = keys_per_query(m.attention, dict(m.attention_options), length,
                        m.qkv_dim // m.num_heads)
  per_token = 8 * m.emb_dim * m.qkv_dim + 4 * m.emb_dim * m.mlp_dim + 4 * keys * m.qkv_dim
  return 3.0 * m.num_layers * tokens * per_token


def measured_steps_per_second(workdir: pathlib.Path) -> tuple[float | None, int]:
  """(median train steps/s, last logged step) of a workdir's metrics.jsonl; (None, 0) if none."""
  lines = [m for m in writer.read_metrics(workdir) if m.get('split') == 'train']
  if not lines:
    return None, 0
  return float(np.median([m['steps_per_second'] for m in lines])), lines[-1]['step']


def estimate_seconds(run: Run, config, flops_per_second: float,
                     splits: dict | None) -> tuple[float, str]:
  """(seconds left, how it was estimated) of a run: measured where it ran, else from FLOPs."""
  if not needs_launch(run):
    return 0.0, run_state(run).split(':')[0]
  steps = config.train.steps
  rate, last = measured_steps_per_second(run.folder)
  if rate:
    return (steps - last) / rate, f'measured {rate:.2f} steps/s, training only'
  # Another seed of the same task and attention trains at the same speed.
  for sibling in sorted(run.folder.parent.glob('seed*')):
    rate, _ = measured_steps_per_second(sibling)
    if rate:
      return steps / rate, f'{rate:.2f} steps/s measured in {sibling.name}, training only'
  flops = step_flops(config)
  # Forward passes of the evaluations: valid every eval_every steps, then test.
  batch = config.data.batch_size
  if splits:
    valid = config.train.eval_batches or math.ceil(len(splits['valid'].source) / batch)
    evals = steps // config.train.eval_every * valid + math.ceil(len(splits['test'].source) / batch)
  else:
    evals = 0
  seconds = RUN_OVERHEAD_S + (steps + evals / 3) * flops / flops_per_second
  return seconds, (f'{flops / 1e9:.1f} GFLOP/step at {flops_per_second / 1e9:.0f} GFLOP/s '
                   f'+ {RUN_OVERHEAD_S:.0f} s')


def launch(run: Run, timeout: float | None) -> None:
  """Runs `run.command` from the repository root, its output appended to launch.log.

  On failure writes error.txt: what happened and the last lines of the attempt's output.
  """
  run.folder.mkdir(parents=True, exist_ok=True)
  error_path = run.folder / 'error.txt'
  error_path.unlink(missing_ok=True)
  log_path = run.folder / 'launch.log'
  with open(log_path, 'a') as log:
    log.write(f'=== {time.strftime("%Y-%m-%d %H:%M:%S")} {run.shown()}\n')
    start = log.tell()
    log.flush()
    try:
      code = subprocess.run(run.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            timeout=timeout, check=False).returncode
      what = None if code == 0 else (f'killed by signal {-code} (out of memory?)' if code < 0
                                     else f'exit code {code}')
    except subprocess.TimeoutExpired:
      what = f'timed out after {timeout:.0f} s'
  if what is None and (run.folder / 'results.json').exists():
    return
  with open(log_path) as log:
    log.seek(start)
    tail = log.read().strip().splitlines()[-LOG_LINES:]
  error_path.write_text('\n'.join([what or 'no results.json written', *tail]) + '\n')


def outcome(run: Run) -> dict:
  """What a run's workdir holds: accuracy, or the kind of failure and its log's last lines."""
  info = {'task': run.task, 'attention': run.attention, 'seed': run.seed,
          'workdir': str(run.workdir), 'command': run.shown()}
  results_path = run.folder / 'results.json'
  error_path = run.folder / 'error.txt'
  state = run_state(run)
  if state.startswith('stale'):
    return {**info, 'status': 'stale', 'error': state, 'log_tail': []}
  if results_path.exists():
    results = json.loads(results_path.read_text())
    return {**info, 'status': 'done', 'accuracy': results['test']['accuracy'],
            'best_step': results['best_step'], 'wall_seconds': results['wall_seconds']}
  if error_path.exists():
    lines = error_path.read_text().splitlines()
    text = '\n'.join(lines).lower()
    status = ('timed out' if lines[0].startswith('timed out') else
              'out of memory' if 'signal 9' in lines[0] or 'resource_exhausted' in text
              or 'out of memory' in text else 'failed')
    return {**info, 'status': status, 'error': lines[0], 'log_tail': lines[1:]}
  return {**info, 'status': 'not run'}


def summarize(outcomes: list[dict]) -> dict:
  """Accuracy (%) over the finished seeds of one (task, attention): mean, min, max, std."""
  accuracies = [100 * o['accuracy'] for o in outcomes if o['status'] == 'done']
  row = {'seeds': len(outcomes), 'finished': len(accuracies), 'accuracies': accuracies,
         'failures': {o['seed']: o['status'] for o in outcomes if o['status'] != 'done'}}
  if accuracies:
    row.update(mean=float(np.mean(accuracies)), min=min(accuracies), max=max(accuracies),
               std=float(np.std(accuracies)))
  return row


def paper_number(task: str, attention: str) -> float | str | None:
  """LRA Table 1's test accuracy (%): a number, 'fail' (Path-X) or None (not in the table)."""
  if attention not in PAPER:
    return None
  if task == 'pathx':
    return 'fail'
  return PAPER[attention][1][PAPER_TASKS.index(task)]


def paper_text(task: str, attention: str) -> str:
  """`paper_number` as a table shows it: '36.37', 'fail' or '-'."""
  paper = paper_number(task, attention)
  return '-' if paper is None else paper if isinstance(paper, str) else f'{paper:.2f}'


def format_cell(row: dict) -> str:
  """'35.10 [34.20, 36.00] (3/3)', or the failure when no seed finished."""
  if not row['finished']:
    kinds = sorted(set(row['failures'].values()))
    return ', '.join(kinds) if kinds else 'not run'
  spread = f' [{row["min"]:.2f}, {row["max"]:.2f}]' if row['finished'] > 1 else ''
  failed = ''.join(f'; seed {seed} {kind}' for seed, kind in row['failures'].items())
  return f'{row["mean"]:.2f}{spread} ({row["finished"]}/{row["seeds"]}{failed})'


def write_results(out_stem: pathlib.Path, header: dict, task_info: dict, rows: dict,
                  outcomes: list[dict]) -> None:
  """Writes `<out_stem>.json` (everything) and `<out_stem>.md` (the tables).

  Args:
    out_stem: output path without extension.
    header: scale, command, machine, seeds, attentions.
    task_info: task -> config, data status (or what provides it), majority class.
    rows: (task, attention) -> `summarize` of its runs.
    outcomes: `outcome` of every run.
  """
  out_stem.parent.mkdir(parents=True, exist_ok=True)
  json_rows = [{'task': t, 'attention': a, 'paper': paper_number(t, a), **row}
               for (t, a), row in rows.items()]
  out_stem.with_suffix('.json').write_text(json.dumps(
      {**header, 'tasks': task_info, 'rows': json_rows, 'runs': outcomes}, indent=1) + '\n')
  machine = header['machine']
  lines = [
      f'# Long Range Arena accuracy, scale {header["scale"]}', '',
      f'Command: `{header["command"]}`', '',
      f'Machine: {machine["cpu"]}, {machine["cores"]} cores, jax backend {machine["backend"]}.',
      '',
      'Test accuracy (%) of the checkpoint with the best validation accuracy (launch.py), '
      'as "mean [min, max] (finished seeds / planned seeds)" over seeds 0, 1, ...: the '
      'spread is the min-max range over seeds. "paper": LRA Table 1 (Tay et al. 2020; '
      'Path-X: every model failed). "majority class": the share of the most frequent '
      'label among the targets of the test split, read with `efficient_attn.data.get_task` '
      'exactly as the runs read it; a model at this rate has learned nothing. A run that '
      'failed, timed out or ran out of memory is named as such, never given a number. '
      'Model sizes and steps: the config files (their docstrings say how each scale differs '
      'from the paper).', '',
      '## Tasks', '',
      '| task | config | data | majority class (test) |', '|---|---|---|---|']
  for task, info in task_info.items():
    majority = info.get('majority')
    rate = (f'{100 * majority["rate"]:.2f}% (label {majority["label"]}; '
            f'{majority["examples"]} examples)' if majority else '-')
    lines.append(f'| {task} | `{info["config"]}` | {info["data"]} | {rate} |')
  titles = [TITLES[task] for task in task_info]
  lines += ['', '## Test accuracy (%)', '',
            '| model | attention | ' + ' | '.join(f'{t} | paper' for t in titles) + ' |',
            '|---|---|' + '---|---|' * len(titles)]
  for attention in header['attentions']:
    cells = []
    for task, info in task_info.items():
      row = rows.get((task, attention))
      cells += [format_cell(row) if row else 'no data', paper_text(task, attention)]
    model = PAPER[attention][0] if attention in PAPER else '(not in LRA)'
    lines.append(f'| {model} | {attention} | ' + ' | '.join(cells) + ' |')
  cells = []
  for info in task_info.values():
    cells += [f'{100 * info["majority"]["rate"]:.2f}' if info.get('majority') else '-', '']
  lines.append('| majority class | | ' + ' | '.join(cells) + ' |')
  failed = [o for o in outcomes if o['status'] not in ('done', 'not run')]
  if failed:
    lines += ['', '## Runs without a result', '']
    for o in failed:
      lines.append(f'- {o["task"]} {o["attention"]} seed {o["seed"]}: {o["error"]}')
      if o['log_tail']:
        lines[-1] += f'; last lines of `{o["workdir"]}/launch.log`:'
        lines += ['', '  ```', *(f'  {line}' for line in o['log_tail']), '  ```', '']
  out_stem.with_suffix('.md').write_text('\n'.join(lines).rstrip() + '\n')


def parse_args(argv: list[str] | None):
  """The command line; ValueError naming a bad argument, its value and what is allowed."""
  parser = argparse.ArgumentParser(prog='python -m experiments.lra_accuracy',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--scale', default='cpu', choices=('paper', 'cpu', 'tiny'))
  parser.add_argument('--tasks', default='listops,pathfinder32',
                      help=f'comma-separated, or all: {", ".join(TASKS)}')
  parser.add_argument('--attention', default='all',
                      help='comma-separated registered attentions, or all (the LRA models)')
  parser.add_argument('--seeds', type=int, default=3, help=f'seeds of {", ".join(CARD)}')
  parser.add_argument('--seeds_others', type=int, default=1, help='seeds of the other models')
  parser.add_argument('--jobs', type=int, default=1, help='runs at once')
  parser.add_argument('--timeout', type=float, default=0, help='seconds per run; 0: no limit')
  parser.add_argument('--runs_dir', default='runs/lra', type=pathlib.Path)
  parser.add_argument('--override', action='append', default=[],
                      help='config key=value for every run, e.g. train.steps=100 (repeatable)')
  parser.add_argument('--out', default=None, type=pathlib.Path,
                      help='output path without extension; default '
                           'experiments/results/lra_accuracy_<scale>')
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                      help='print the plan and time estimates, run nothing')
  args = parser.parse_args(argv)
  for name in ('seeds', 'seeds_others', 'jobs'):
    if getattr(args, name) < 1:
      raise ValueError(f'--{name}={getattr(args, name)} must be at least 1')
  if args.timeout < 0:
    raise ValueError(f'--timeout={args.timeout} must be positive, or 0 for no limit')
  # Columns in the order of the paper's table.
  args.tasks = sorted(parse_names(args.tasks, tuple(TASKS), tuple(TASKS), '--tasks'),
                      key=list(TASKS).index)
  args.attention = parse_names(args.attention, ea.available_attentions(), tuple(PAPER),
                               '--attention')
  args.override = [parse_override(text) for text in args.override]
  return args


def plan(args) -> tuple[dict, list[tuple[Run, object, dict | None]]]:
  """Per task its data status (and, unless a dry run, its majority class); every run.

  Returns:
    task -> info, and every run with its config and its task's splits (None when
    the data are not there yet).
  """
  task_info, runs = {}, []
  for task in args.tasks:
    path, extra = TASKS[task]
    base = task_config(task, args.attention[0], args.scale, args.override)
    splits, missing = load_data(task, base, prepare=not args.dry_run)
    info = {'config': f'{path}:<attention>,{args.scale}{extra}', 'data': missing or 'present'}
    if splits and not args.dry_run:
      info['majority'] = majority_class(splits['test'])
    task_info[task] = info
    if missing and task not in GENERATED:
      continue
    for attention in args.attention:
      config = task_config(task, attention, args.scale, args.override)
      seeds = args.seeds if attention in CARD else args.seeds_others
      for seed in range(seeds):
        config.seed = seed
        runs.append((make_run(task, attention, seed, args.scale, args.runs_dir, args.override,
                              config), config, splits))
  return task_info, runs


def dry_run(args) -> float:
  """Prints every run (state, estimated time, command) and the absent data; returns seconds."""
  task_info, runs = plan(args)
  rate = ACCELERATOR_FLOPS * UTILISATION if args.scale == 'paper' else CPU_FLOPS
  total = 0.0
  for run, config, splits in runs:
    seconds, how = estimate_seconds(run, config, rate, splits)
    total += seconds
    print(f'{run.task} {run.attention} seed {run.seed}: {run_state(run)}; about '
          f'{seconds / 60:.1f} min ({how}); paper: {paper_text(run.task, run.attention)}\n'
          f'  {run.shown()}')
  for task, info in task_info.items():
    if info['data'] != 'present':
      print(f'{task}: data {info["data"]}')
  where = (f'one accelerator, an A100: {ACCELERATOR_FLOPS / 1e12:.0f} TFLOP/s TF32 peak at '
           f'{100 * UTILISATION:.0f}% utilisation' if args.scale == 'paper' else
           'this CPU, calibrated on the measured cpu-scale ListOps run')
  print(f'{len(runs)} runs, about {total / 3600:.2f} h one after another. Estimates, not '
        'measurements: measured steps/s where a workdir has metrics.jsonl, else the FLOPs of '
        'each step counted from the model sizes and each mechanism\'s keys per query '
        f'(evaluation included) at an effective {rate / 1e9:.0f} GFLOP/s '
        f'({where}), plus {RUN_OVERHEAD_S:.0f} s per run for start-up and compilation.')
  return total


def main(argv: list[str] | None = None) -> int:
  """Runs (or collects, or with --dry-run plans) the grid and writes the tables."""
  args = parse_args(argv)
  command = shlex.join(['python', '-m', 'experiments.lra_accuracy',
                        *(sys.argv[1:] if argv is None else argv)])
  if args.dry_run:
    dry_run(args)
    return 0
  task_info, runs = plan(args)
  pending = [run for run, _, _ in runs if needs_launch(run)]
  print(f'{len(runs)} runs: {len(runs) - len(pending)} done, {len(pending)} to run '
        f'({args.jobs} at once)', flush=True)
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    futures = {pool.submit(launch, run, args.timeout or None): run for run in pending}
    for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
      future.result()
      done = outcome(futures[future])
      result = (f'{100 * done["accuracy"]:.2f}%' if done['status'] == 'done'
                else f'{done["status"]}: {done["error"]}')
      print(f'[{count}/{len(pending)}] {done["task"]} {done["attention"]} seed {done["seed"]}: '
            f'{result}', flush=True)
  outcomes = [outcome(run) for run, _, _ in runs]
  rows = {}
  for task in args.tasks:
    for attention in args.attention:
      mine = [o for o in outcomes if (o['task'], o['attention']) == (task, attention)]
      if mine:
        rows[(task, attention)] = summarize(mine)
  out = args.out or ROOT / 'experiments' / 'results' / f'lra_accuracy_{args.scale}'
  header = {'scale': args.scale, 'command': command, 'machine': bench.machine_info(),
            'seeds': {'card': args.seeds, 'others': args.seeds_others},
            'attentions': args.attention}
  write_results(out, header, task_info, rows, outcomes)
  print(f'wrote {out}.md and {out}.json')
  return 0 if all(o['status'] == 'done' for o in outcomes) else 1


if __name__ == '__main__':
  sys.exit(main())
