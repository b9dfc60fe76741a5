"""LRA Table 2: training steps/s and peak memory of every attention on the byte-level Text model.

  python -m experiments.lra_speed_memory                     # every LRA model, 1K-4K
  python -m experiments.lra_speed_memory --attention full,performer --lengths 1024,8192

The model and optimizer are those of `configs/text.py:<attention>,<scale>` (scale
'paper': 4 layers, emb 256, 4 heads, mlp 1024, dropout 0.1, AdamW) with
data.seq_len set to the length and the attention options of `configs/base.py` for
that length (the CLS token makes one more position). Inputs are random bytes of
that length with full validity masks (no data files needed). Rows: the eleven LRA
models, with the Transformer twice: `full` with backend='dense' (materialized
scores, the paper's baseline) and `full` with the blocked kernel ('full' in
--attention means both). `--attention routing` adds the Routing Transformer,
which is not in the LRA tables.

Each case (row, length) runs in a fresh interpreter on one device, which compiles
the jitted training step (forward, backward, optimizer update, donated state),
runs it once untimed and then `--steps` times, each to `block_until_ready`:
- steps/s: 1 / the fastest timed step;
- step GB: the peak resident set during the warm-up and timed steps minus the
  resident set just before them (compilation excluded), as `efficient_attn.bench`;
- XLA GB: the buffers XLA plans for the compiled step (`memory_analysis()`:
  arguments (state, batch) + outputs not aliasing them + temporaries), the
  closest to the paper's peak memory per device. (Its `peak_memory_in_bytes`
  counts only the arguments on CPU.) On an accelerator XLA GB is device memory
  and step GB host memory.
A case is stopped and reported as 'timeout' after `--timeout` seconds, and as
'out of memory' when XLA plans more than `--memory_limit` GB or the resident set
of its process passes that limit (a thread of the child watches it), never as
a number. A child that stops using the CPU (all threads idle; seen in the
Performer step while it called LAPACK's QR, which it no longer does) is reported
by the same thread as 'stalled' after 30 s, and the case is run again, up to 3
times in all.

The paper timed batch 32 on a TPU v3 4x4 slice (32 cores) and its figure included
evaluation and compilation; here the training step alone is timed, on CPU. On this
machine (2 cores, 23 GB shared) the dense Transformer at 4K needs 4.2 GB of XLA
buffers and 5.5 GB of resident memory per example (batch 32: about 130 GB), so the
default batch is 2, the largest that fits with room to spare under the default
16 GB limit (batch 3 would reach it).

Writes experiments/results/lra_speed_memory.{md,json,png} (or --out).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np

from configs import base
from configs import load_config
from efficient_attn import bench
from efficient_attn.data import common
from efficient_attn.data import text
from efficient_attn.train import steps as steps_lib
from efficient_attn.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / 'experiments' / 'results' / 'lra_speed_memory'

# Row -> (registered attention, options added to the config's), in the order of
# the paper's Table 1.
ROWS = {
    'full-dense': ('full', {'backend': 'dense'}),
    'full-blocked': ('full', {'backend': 'blocked'}),
    'local': ('local', {}),
    'sparse': ('sparse', {}),
    'longformer': ('longformer', {}),
    'linformer': ('linformer', {}),
    'lsh': ('lsh', {}),
    'sinkhorn': ('sinkhorn', {}),
    'synthesizer': ('synthesizer', {}),
    'bigbird': ('bigbird', {}),
    'linear': ('linear', {}),
    'performer': ('performer', {}),
}
EXTRA_ROWS = {'routing': ('routing', {})}
ALL_ROWS = {**ROWS, **EXTRA_ROWS}
MODEL_NAMES = {
    'full-dense': 'Transformer (dense)', 'full-blocked': 'Transformer (blocked)',
    'local': 'Local Attention', 'sparse': 'Sparse Trans.', 'longformer': 'Longformer',
    'linformer': 'Linformer', 'lsh': 'Reformer', 'sinkhorn': 'Sinkhorn Trans.',
    'synthesizer': 'Synthesizer', 'bigbird': 'BigBird', 'linear': 'Linear Trans.',
    'performer': 'Performer', 'routing': 'Routing Trans.',
}
DENSE, BLOCKED = 'full-dense', 'full-blocked'

# LRA Table 2 (Tay et al. 2020), Text, batch 32, TPU v3 4x4: steps/s and peak
# memory per device (GB) at these lengths. Its Transformer is the dense one.
PAPER_LENGTHS = (1024, 2048, 3072, 4096)
PAPER = {
    'full-dense': ((8.1, 4.9, 2.3, 1.4), (0.85, 2.65, 5.51, 9.48)),
    'local': ((9.2, 8.4, 7.4, 7.4), (0.42, 0.76, 1.06, 1.37)),
    'linformer': ((9.3, 9.1, 8.5, 7.7), (0.37, 0.55, 0.99, 0.99)),
    'lsh': ((4.4, 2.2, 1.5, 1.1), (0.48, 0.99, 1.53, 2.28)),
    'sinkhorn': ((9.1, 7.9, 6.6, 5.3), (0.47, 0.83, 1.13, 1.48)),
    'synthesizer': ((8.7, 5.7, 6.6, 1.9), (0.65, 1.98, 4.09, 6.99)),
    'bigbird': ((7.4, 3.9, 2.7, 1.5), (0.77, 1.49, 2.18, 2.88)),
    'linear': ((9.1, 9.3, 8.6, 7.8), (0.37, 0.57, 0.80, 1.03)),
    'performer': ((9.5, 9.4, 8.7, 8.0), (0.37, 0.59, 0.82, 1.06)),
}
TIMEOUT, OUT_OF_MEMORY, STALLED, FAILED = 'timeout', 'out of memory', 'stalled', 'failed'
GB = 1e9
# How often the child compares its resident set with the limit.
WATCH_SECONDS = 0.02
# A child that used under 1% of a core over this long is stalled (every thread idle).
STALL_SECONDS = 30.0
# Runs of a case that stalled, in all.
ATTEMPTS = 3


def case_config(row: str, length: int, scale: str, batch: int):
  """The text config of `row` at `scale`, for inputs of `length` bytes in batches of `batch`."""
  attention, options = ALL_ROWS[row]
  config = load_config(str(ROOT / 'configs' / 'text.py'), f'{attention},{scale}')
  config.data.seq_len = length
  config.data.batch_size = batch
  positions = base.attention_length(length, config.model.pooling)
  config.model.attention_options = {
      **base.attention_defaults(attention, positions, scale), **options}
  return config


def random_batch(batch: int, length: int, seed: int = 0) -> dict:
  """A Text batch of random byte ids, every position and example real."""
  rng = np.random.default_rng(seed)
  return {'inputs': rng.integers(1, common.BYTE_VOCAB_SIZE, (batch, length), np.int32),
          'mask': np.ones((batch, length), bool),
          'targets': rng.integers(0, text.NUM_CLASSES, (batch,), np.int32),
          'weights': np.ones((batch,), np.float32)}


def run_case(row: str, length: int, batch: int, scale: str, steps: int,
             memory_limit: float) -> dict:
  """Compiles and times the training step of one case in this process.

  Args:
    row: a key of ALL_ROWS.
    length: input bytes per example.
    batch: examples per step.
    scale: model scale of the text config.
    steps: timed steps after the warm-up step.
    memory_limit: GB; a step whose XLA buffers exceed it is not run.

  Returns:
    The result row: steps_per_second, peak_bytes (step RSS), xla_bytes, or an error.
  """
  config = case_config(row, length, scale, batch)
  trainer.check_config(config, num_devices=1)
  task = common.Task(name='text', split='train', source=None,
                     vocab_size=common.BYTE_VOCAB_SIZE, num_classes=text.NUM_CLASSES,
                     seq_len=length)
  result = {'row': row, 'length': length,
            'options': dict(config.model.attention_options)}
  fns, state = trainer.init_state(config, task)
  train_step = jax.jit(steps_lib.make_train_step(fns), donate_argnums=(0,))
  state, inputs = jax.device_put((state, random_batch(batch, length)))
  start = time.perf_counter()
  compiled = train_step.lower(state, inputs).compile()
  result['compile_seconds'] = time.perf_counter() - start
  stats = compiled.memory_analysis()
  # Outputs aliasing donated arguments are counted once.
  result['xla_bytes'] = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                         - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  if result['xla_bytes'] > memory_limit * GB:
    return {**result, 'status': OUT_OF_MEMORY,
            'error': f'XLA plans {result["xla_bytes"] / GB:.1f} GB of buffers, over the '
                     f'--memory_limit of {memory_limit:g} GB'}
  current = [state]

  def step():
    current[0], metrics = compiled(current[0], inputs)
    jax.block_until_ready((current[0], metrics))

  before = bench.status_bytes('VmRSS')
  bench.reset_peak_rss()
  seconds = bench.min_time(step, steps)
  return {**result, 'status': 'ok', 'seconds': seconds, 'steps_per_second': 1 / seconds,
          'peak_bytes': bench.status_bytes('VmHWM') - before}


def check_progress(rss: int, memory_limit: float, cpu_seconds: float,
                   wall_seconds: float) -> tuple[str, str] | None:
  """(status, error) of a child over the memory limit or stalled, else None.

  Args:
    rss: the child's resident set in bytes.
    memory_limit: GB.
    cpu_seconds: CPU time the child's other threads used over the last `wall_seconds`.
    wall_seconds: time since the last progress check.

  Returns:
    ('out of memory' or 'stalled', what happened), or None while all is well.
  """
  if rss > memory_limit * GB:
    return OUT_OF_MEMORY, (f'resident set {rss / GB:.1f} GB passed the --memory_limit of '
                           f'{memory_limit:g} GB')
  if wall_seconds >= STALL_SECONDS and cpu_seconds < 0.01 * wall_seconds:
    return STALLED, f'{cpu_seconds:.2f} s of CPU in {wall_seconds:.0f} s: XLA never finished'
  return None


def watch(case: dict) -> None:
  """Ends this process with an error row once it passes the memory limit or stalls."""
  # CPU time of the process minus this thread's own.
  others = lambda: time.process_time() - time.thread_time()
  start, cpu_start = time.monotonic(), others()
  while True:
    wall = time.monotonic() - start
    cpu = others() - cpu_start
    verdict = check_progress(bench.status_bytes('VmRSS'), case['memory_limit'], cpu, wall)
    if verdict:
      status, error = verdict
      print(json.dumps({'row': case['row'], 'length': case['length'], 'status': status,
                        'error': error}), flush=True)
      os._exit(1)
    if wall >= STALL_SECONDS:
      start, cpu_start = time.monotonic(), others()
    time.sleep(WATCH_SECONDS)


def run_in_subprocess(case: dict, timeout: float) -> dict:
  """`run_case(**case)` in a fresh interpreter, stopped after `timeout` s; rerun if it stalls."""
  for attempt in range(1, ATTEMPTS + 1):
    result = {**_run_once(case, timeout), 'attempts': attempt}
    if result['status'] != STALLED:
      break
  return result


def _run_once(case: dict, timeout: float) -> dict:
  """One run of `run_case(**case)` in a fresh interpreter."""
  command = [sys.executable, '-m', 'experiments.lra_speed_memory', '--case', json.dumps(case)]
  failure = {'row': case['row'], 'length': case['length']}
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {**failure, 'status': TIMEOUT, 'error': f'no result after {timeout:g} s'}
  lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
  if lines:
    return json.loads(lines[-1])
  if done.returncode == -9:
    return {**failure, 'status': OUT_OF_MEMORY, 'error': 'killed by the system (SIGKILL)'}
  tail = (done.stderr.strip().splitlines() or [f'exit code {done.returncode}'])[-1]
  return {**failure, 'status': FAILED, 'error': tail[:300]}


def length_label(length: int) -> str:
  """'4K' for 4096, the number itself otherwise."""
  return f'{length // 1024}K' if length % 1024 == 0 else str(length)


def paper_value(row: str, length: int, column: int) -> float | None:
  """The paper's steps/s (column 0) or peak GB (column 1) of `row` at `length`, if any."""
  if row not in PAPER or length not in PAPER_LENGTHS:
    return None
  return PAPER[row][column][PAPER_LENGTHS.index(length)]


def _cell(result: dict | None, key: str, scale: float = 1.0) -> str:
  """A measured value, the status of a case over a limit, or '-' for a case not run."""
  if result is None:
    return '-'
  if result['status'] != 'ok':
    return result['status']
  return f'{result[key] / scale:.2f}'


def _number(value: float | None, digits: int = 2) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
  return None if numerator is None or not denominator else numerator / denominator


def _measured(result: dict | None, key: str) -> float | None:
  """`result[key]` of a case that ran, else None."""
  return result[key] if result and result['status'] == 'ok' else None


def markdown(results: list[dict], info: dict) -> str:
  """The tables of `results` beside the paper's Table 2, with the command and machine."""
  rows = [r for r in ALL_ROWS if any(x['row'] == r for x in results)]
  lengths = sorted({x['length'] for x in results})
  get = {(x['row'], x['length']): x for x in results}.get
  load = lambda key: ', '.join(f'{x:.2f}' for x in info[key])
  versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items())
  labels = [length_label(n) for n in lengths]
  paper_4k = PAPER_LENGTHS[-1]
  lines = [
      '# LRA Table 2: training speed and memory, byte-level Text', '',
      f'Command: `{info["command"]}`', '',
      f'Machine: {info["cpu"]}, {info["cores"]} cores, {info["memory_gib"]} GiB, jax backend '
      f'{info["backend"]}; load average (1, 5, 15 min) at start {load("load_start")}, at end '
      f'{load("load_end")}. Libraries: {versions}.', '',
      f'Model: `configs/text.py:<attention>,{info["scale"]}` ({info["model"]}), data.seq_len = '
      f'the length (the attention sees one more position, the CLS token), batch '
      f'{info["batch"]} of random bytes with full masks, float32, one device. Timed: the '
      f'jitted training step alone (forward, backward, optimizer update), fastest of '
      f'{info["steps"]} steps after one warm-up step, each to block_until_ready. The paper '
      'timed batch 32 on a TPU v3 4x4 slice (32 cores) and its figure included evaluation '
      'and compilation; ours is the train step alone on CPU, so compare ratios, not '
      'absolute numbers. Each case in its own process, limited to '
      f'{info["timeout"]:g} s and {info["memory_limit"]:g} GB: "timeout" and "out of '
      'memory" are cases over a limit; "stalled": XLA never finished a step in 3 tries.', '',
      '## Steps per second', '',
      '| model | ' + ' | '.join(f'{x} ours | {x} paper' for x in labels) + ' |',
      '|---|' + '---|---|' * len(lengths),
  ]
  for row in rows:
    cells = [f'{_cell(get((row, n)), "steps_per_second")} | '
             f'{_number(paper_value(row, n, 0), 1)}' for n in lengths]
    lines.append(f'| {MODEL_NAMES[row]} | ' + ' | '.join(cells) + ' |')
  lines += [
      '', '## Relative to the Transformer', '',
      '"x dense", "x blocked": steps/s over those of the dense or the blocked Transformer '
      '(same length, same run); "mem / dense": XLA GB over the dense Transformer\'s. The '
      'paper\'s columns are its 4K numbers over its Transformer\'s.', '',
      '| model | ' + ' | '.join(f'{x} x dense | {x} x blocked | {x} mem / dense'
                              for x in labels)
      + ' | paper 4K x Transformer | paper 4K mem / Transformer |',
      '|---|' + '---|---|---|' * len(lengths) + '---|---|',
  ]
  for row in rows:
    cells = []
    for n in lengths:
      ours = get((row, n))
      speed = lambda other: _number(_ratio(_measured(ours, 'steps_per_second'),
                                           _measured(get((other, n)), 'steps_per_second')))
      memory = _ratio(_measured(ours, 'xla_bytes'), _measured(get((DENSE, n)), 'xla_bytes'))
      cells.append(f'{speed(DENSE)} | {speed(BLOCKED)} | {_number(memory)}')
    paper = [_number(_ratio(paper_value(row, paper_4k, c), paper_value(DENSE, paper_4k, c)))
             for c in (0, 1)]
    lines.append(f'| {MODEL_NAMES[row]} | ' + ' | '.join(cells + paper) + ' |')
  lines += [
      '', '## Peak memory (GB = 1e9 bytes)', '',
      '"step": peak resident set of the process during the steps minus the one just before '
      '(compilation, parameters and inputs excluded); "XLA": the buffers XLA plans for '
      'the compiled step (state, batch, activations, outputs), the analogue of the '
      'paper\'s peak memory per device.', '',
      '| model | ' + ' | '.join(f'{x} step | {x} XLA | {x} paper' for x in labels) + ' |',
      '|---|' + '---|---|---|' * len(lengths),
  ]
  for row in rows:
    cells = [f'{_cell(get((row, n)), "peak_bytes", GB)} | {_cell(get((row, n)), "xla_bytes", GB)}'
             f' | {_number(paper_value(row, n, 1))}' for n in lengths]
    lines.append(f'| {MODEL_NAMES[row]} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Attention options', '',
            f'At length {lengths[-1]} (max_len and budgets follow the length).', '',
            '| model | attention | options |', '|---|---|---|']
  for row in rows:
    options = case_config(row, lengths[-1], info['scale'], info['batch']).model.attention_options
    text = ', '.join(f'{k}={v}' for k, v in options.items())
    lines.append(f'| {MODEL_NAMES[row]} | {ALL_ROWS[row][0]} | {text or "-"} |')
  failures = [x for x in results if x['status'] != 'ok']
  if failures:
    lines += ['', '## Cases without a measurement', '']
    lines += [f'- {MODEL_NAMES[x["row"]]} at {x["length"]}: {x["status"]} ({x["error"]})'
              for x in failures]
  return '\n'.join(lines) + '\n'


def plot(results: list[dict], path: str) -> None:
  """Steps/s and XLA memory against length, one line per row, log scales."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  lengths = sorted({x['length'] for x in results})
  for row in ALL_ROWS:
    done = sorted((x['length'], x) for x in results if x['row'] == row and x['status'] == 'ok')
    if not done:
      continue
    axes[0].plot([n for n, _ in done], [x['steps_per_second'] for _, x in done], marker='o',
                 label=MODEL_NAMES[row])
    axes[1].plot([n for n, _ in done], [x['xla_bytes'] / GB for _, x in done], marker='o')
  for axis, label in zip(axes, ('training steps/s', 'XLA memory of the step (GB)')):
    axis.set_xscale('log', base=2)
    axis.set_xticks(lengths, [str(n) for n in lengths])
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axis.set_yscale('log')
    axis.set_xlabel('length (bytes)')
    axis.set_ylabel(label)
    axis.grid(True, which='both', alpha=0.3)
  axes[0].legend(fontsize=8)
  figure.suptitle('LRA Text model: training step on CPU (cases over a limit left out)')
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_results(results: list[dict], info: dict, out_stem: str, with_plot: bool) -> None:
  """Writes `<out_stem>.json`, `.md` and, with `with_plot`, `.png`."""
  os.makedirs(os.path.dirname(out_stem) or '.', exist_ok=True)
  with open(out_stem + '.json', 'w') as f:
    json.dump({'command': info['command'], 'machine': info, 'rows': results}, f, indent=1)
  with open(out_stem + '.md', 'w') as f:
    f.write(markdown(results, info))
  if with_plot:
    plot(results, out_stem + '.png')


def _positive(kind):
  """An argparse type: `kind` values above zero."""

  def parse(text: str):
    value = kind(text)
    if value <= 0:
      raise argparse.ArgumentTypeError(f'must be positive, got {text!r}')
    return value

  return parse


def parse_rows(text: str) -> list[str]:
  """The rows of --attention: 'all', or a comma list of row names ('full' for both Transformers)."""
  if text == 'all':
    return list(ROWS)
  rows = []
  for name in text.split(','):
    names = [DENSE, BLOCKED] if name == 'full' else [name]
    if names[0] not in ALL_ROWS:
      raise argparse.ArgumentTypeError(
          f'unknown attention {name!r}; allowed: all, full, {", ".join(ROWS)}, '
          f'{", ".join(EXTRA_ROWS)}')
    rows += [n for n in names if n not in rows]
  return rows


def parse_lengths(text: str) -> list[int]:
  """The lengths of --lengths: positive ints, comma-separated."""
  try:
    lengths = [int(x) for x in text.split(',')]
  except ValueError:
    lengths = []
  if not lengths or min(lengths) < 1:
    raise argparse.ArgumentTypeError(f'must be comma-separated positive ints, got {text!r}')
  return lengths


def main(argv=None) -> None:
  """Parses flags and runs every (length, row) case, each in a subprocess."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--attention', type=parse_rows, default='all',
                      help=f'comma-separated rows: {", ".join(ROWS)} ("full" for both '
                      f'Transformer rows), or {", ".join(EXTRA_ROWS)}; "all": the LRA rows')
  parser.add_argument('--lengths', type=parse_lengths, default='1024,2048,3072,4096',
                      help='comma-separated input lengths, e.g. 1024,2048,3072,4096,8192,16384')
  parser.add_argument('--batch', type=_positive(int), default=2,
                      help='examples per step (default 2: what the dense Transformer at 4K '
                      'fits in here, see the docstring)')
  parser.add_argument('--scale', default='paper', choices=base.SCALES,
                      help='model scale of configs/text.py')
  parser.add_argument('--steps', type=_positive(int), default=5,
                      help='timed steps after one warm-up step')
  parser.add_argument('--timeout', type=_positive(float), default=900.0,
                      help='seconds per case, compilation included')
  parser.add_argument('--memory_limit', type=_positive(float), default=16.0,
                      help='GB per case (XLA buffers and the resident set of its process)')
  parser.add_argument('--out', default=str(DEFAULT_OUT), help='output path without extension')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.case:
    case = json.loads(args.case)
    threading.Thread(target=watch, args=(case,), daemon=True).start()
    print(json.dumps(run_case(**case)), flush=True)
    return

  config = case_config(args.attention[0], args.lengths[0], args.scale, args.batch).model
  info = {**bench.machine_info(), 'load_start': os.getloadavg(),
          'command': 'python -m experiments.lra_speed_memory ' + ' '.join(
              sys.argv[1:] if argv is None else argv),
          'scale': args.scale, 'batch': args.batch, 'steps': args.steps,
          'timeout': args.timeout, 'memory_limit': args.memory_limit,
          'model': f'{config.num_layers} layers, emb {config.emb_dim}, {config.num_heads} '
                   f'heads, qkv {config.qkv_dim}, mlp {config.mlp_dim}, dropout '
                   f'{config.dropout_rate}'}
  results = []
  for length in args.lengths:
    for row in args.attention:
      case = dict(row=row, length=length, batch=args.batch, scale=args.scale,
                  steps=args.steps, memory_limit=args.memory_limit)
      results.append(run_in_subprocess(case, args.timeout))
      print(json.dumps(results[-1]), flush=True)
      info['load_end'] = os.getloadavg()
      write_results(results, info, args.out, with_plot=False)
  write_results(results, info, args.out, with_plot=True)
  print(f'wrote {args.out}.md, .json, .png')


if __name__ == '__main__':
  main()
