"""Speed and memory of every attention mechanism, each case in its own process.

Usage:
  python -m efficient_attn.bench --attention all --lengths 1024,4096,16384

For each mechanism and length: forward and forward+backward time (jitted, min
over repeats after a warm-up, `block_until_ready`), and the peak resident memory
of forward+backward minus that of the idle process (jax imported, inputs made).
Results go to `experiments/results/<name>.md` and `.json` with the machine,
library versions and command.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

# Reference row: jax's own dot-product attention, not a registered mechanism.
JAX_REFERENCE = 'jax.nn.dot_product_attention'

# Options each mechanism is benchmarked with (the settings of the paper tables).
BENCH_OPTIONS = {
    'full': {'backend': 'blocked'},
    'lsh': {'chunk_len': 128, 'n_hashes': 2},
    'linformer': {'k': 256},
    'performer': {'num_features': 256},
    'longformer': {'window': 256},
}

# Forward+backward cases whose XLA buffers exceed this are reported, not run.
MEMORY_BUDGET_BYTES = 20 * 2**30


def _rss_peak_bytes() -> int:
  """Peak resident set of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_case_fns(name: str, options: dict, length: int, causal: bool):
  """Pure `forward(params, state, q, k, v)` and `gradients(...)` for the case, with the
  module's params and other state."""
  import jax.numpy as jnp
  from flax import nnx
  import efficient_attn as ea
  from efficient_attn.attention.full import xla_attention

  class JaxReference(nnx.Module):
    """`jax.nn.dot_product_attention` as a module."""

    def __call__(self, q, k, v, causal=False):
      return xla_attention(q, k, v, causal=causal)

  call_kwargs = {'causal': causal}
  if name == JAX_REFERENCE:
    module = JaxReference()
  else:
    options = dict(options)
    if name == 'linformer':
      options.setdefault('max_len', length)
    module = ea.make_attention(name, rngs=nnx.Rngs(0), **options)
  if name == 'longformer':
    # One global token, the first, as in a classification [CLS] setting.
    call_kwargs['global_mask'] = jnp.zeros((1, length), bool).at[:, 0].set(True)
  graphdef, params, state = nnx.split(module, nnx.Param, ...)

  def forward(params, state, q, k, v):
    return nnx.merge(graphdef, params, state)(q, k, v, **call_kwargs)

  def gradients(params, state, q, k, v):
    # nnx.grad, so that mechanisms drawing random numbers may advance their rng state.
    loss = lambda module, q, k, v: jnp.sum(module(q, k, v, **call_kwargs).astype(jnp.float32))
    return nnx.grad(loss, argnums=(0, 1, 2, 3))(nnx.merge(graphdef, params, state), q, k, v)

  return forward, gradients, params, state


def _min_time(fn, args, repeats: int) -> float:
  """Min wall time of `fn(*args)` over repeats, after one warm-up call."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = [first]
  for _ in range(repeats if first < 20 else 0):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def run_case(name: str, length: int, mode: str, causal: bool, batch: int, heads: int,
             head_dim: int, repeats: int) -> dict:
  """Times one (mechanism, length, mode) case in this process; mode is fwd or fwd_bwd."""
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32)
             for key in keys)
  jax.block_until_ready((q, k, v))
  idle_bytes = _rss_peak_bytes()
  forward, gradients, params, state = _make_case_fns(name, BENCH_OPTIONS.get(name, {}), length,
                                                     causal)
  fn = jax.jit(forward if mode == 'fwd' else gradients)
  compiled = fn.lower(params, state, q, k, v).compile()
  stats = compiled.memory_analysis()
  xla_bytes = stats.temp_size_in_bytes + stats.output_size_in_bytes
  result = {'attention': name, 'length': length, 'mode': mode, 'causal': causal,
            'xla_buffer_bytes': xla_bytes}
  if xla_bytes > MEMORY_BUDGET_BYTES:
    result['error'] = f'out of memory: needs {xla_bytes / 2**30:.1f} GiB of buffers'
    return result
  result['seconds'] = _min_time(compiled, (params, state, q, k, v), repeats)
  result['peak_bytes'] = _rss_peak_bytes() - idle_bytes
  return result


def _run_case_in_subprocess(case: dict, timeout: float) -> dict:
  """Runs `run_case(**case)` in a fresh interpreter and returns its result."""
  command = [sys.executable, '-m', 'efficient_attn.bench', '--case', json.dumps(case)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**case, 'error': f'timed out after {timeout:.0f} s'}
  lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
  if done.returncode != 0 or not lines:
    tail = (done.stderr.strip().splitlines() or ['killed (out of memory?)'])[-1]
    return {'attention': case['name'], 'length': case['length'], 'mode': case['mode'],
            'causal': case['causal'], 'error': tail[:200]}
  return json.loads(lines[-1])


def machine_info() -> dict:
  """CPU, core count, memory and library versions of this machine."""
  import flax
  import jax
  import numpy as np
  cpu = platform.processor() or 'unknown'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  memory_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gib': round(memory_gib, 1),
          'backend': jax.default_backend(), 'python': platform.python_version(),
          'jax': jax.__version__, 'flax': flax.__version__, 'numpy': np.__version__}


def _format_seconds(row: dict | None) -> str:
  if row is None:
    return '-'
  if 'error' in row:
    return 'OOM' if 'memory' in row['error'] else 'failed'
  return f'{row["seconds"]:.3f}'


def _format_gb(row: dict | None) -> str:
  if row is None or 'error' in row:
    return '-'
  return f'{row["peak_bytes"] / 1e9:.2f}'


def write_results(rows: list[dict], info: dict, command: str, out_stem: str,
                  baseline: str = 'full') -> None:
  """Writes the result rows as `<out_stem>.json` and a markdown table `<out_stem>.md`."""
  os.makedirs(os.path.dirname(out_stem) or '.', exist_ok=True)
  with open(out_stem + '.json', 'w') as f:
    json.dump({'command': command, 'machine': info, 'rows': rows}, f, indent=1)
  by_key = {(r['attention'], r['causal'], r['length'], r['mode']): r for r in rows}
  names = list(dict.fromkeys((r['attention'], r['causal']) for r in rows))
  lengths = sorted({r['length'] for r in rows})
  lines = [
      f'# Attention speed and memory', '',
      f'Command: `{command}`', '',
      f'Machine: {info["cpu"]}, {info["cores"]} cores, {info["memory_gib"]} GiB, '
      f'backend {info["backend"]}; python {info["python"]}, jax {info["jax"]}, '
      f'flax {info["flax"]}, numpy {info["numpy"]}.', '',
      f'Batch {info["batch"]}, {info["heads"]} heads, head_dim {info["head_dim"]}, float32. Times in seconds (min over repeats after a '
      'warm-up); memory is the peak resident set of forward+backward minus the idle '
      f'process, in GB. "x {baseline}" is the forward+backward speed-up over `{baseline}` '
      'at the same length and causality, measured in the same run.', '',
      '| attention | options | causal | length | fwd s | fwd+bwd s | x ' + baseline +
      ' | peak GB |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for name, causal in names:
    options = ', '.join(f'{k}={v}' for k, v in BENCH_OPTIONS.get(name, {}).items())
    for length in lengths:
      fwd = by_key.get((name, causal, length, 'fwd'))
      fwd_bwd = by_key.get((name, causal, length, 'fwd_bwd'))
      if fwd is None and fwd_bwd is None:
        continue
      base_row = by_key.get((baseline, causal, length, 'fwd_bwd'))
      speedup = '-'
      if fwd_bwd and base_row and 'seconds' in fwd_bwd and 'seconds' in base_row:
        speedup = f'{base_row["seconds"] / fwd_bwd["seconds"]:.1f}'
      lines.append(f'| {name} | {options} | {"yes" if causal else "no"} | {length} | '
                   f'{_format_seconds(fwd)} | {_format_seconds(fwd_bwd)} | {speedup} | '
                   f'{_format_gb(fwd_bwd)} |')
  with open(out_stem + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main(argv=None) -> None:
  """Parses flags and runs every requested case, each in a subprocess."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--attention', default='all',
                      help='comma-separated mechanism names, "all" for every registered '
                      f'one; "{JAX_REFERENCE}" is always added as a reference')
  parser.add_argument('--lengths', default='1024,4096,16384')
  parser.add_argument('--causal', default='no', choices=['no', 'yes', 'both'])
  parser.add_argument('--modes', default='fwd,fwd_bwd')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--timeout', type=float, default=900.0, help='seconds per case')
  parser.add_argument('--out', default='experiments/results/attention_speed',
                      help='output path without extension')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.case:
    case = json.loads(args.case)
    print(json.dumps(run_case(**case)), flush=True)
    return

  import efficient_attn as ea
  registered = ea.available_attentions()
  names = registered if args.attention == 'all' else tuple(args.attention.split(','))
  for name in names:
    if name not in registered and name != JAX_REFERENCE:
      parser.error(f'--attention: unknown attention {name!r}; available: '
                   f'{", ".join(registered)}, all')
  if JAX_REFERENCE not in names:
    names = names + (JAX_REFERENCE,)
  try:
    lengths = [int(x) for x in args.lengths.split(',')]
  except ValueError:
    parser.error(f'--lengths must be comma-separated ints, got {args.lengths!r}')
  modes = args.modes.split(',')
  for mode in modes:
    if mode not in ('fwd', 'fwd_bwd'):
      parser.error(f'--modes: unknown mode {mode!r}; allowed: fwd, fwd_bwd')
  causals = {'no': [False], 'yes': [True], 'both': [False, True]}[args.causal]

  rows = []
  command = 'python -m efficient_attn.bench ' + ' '.join(sys.argv[1:] if argv is None else argv)
  info = {**machine_info(), 'batch': args.batch, 'heads': args.heads, 'head_dim': args.head_dim}
  for causal in causals:
    for name in names:
      if causal and name == 'linformer':
        continue  # Linformer has no causal form.
      for length in lengths:
        for mode in modes:
          case = dict(name=name, length=length, mode=mode, causal=causal, batch=args.batch,
                      heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
          row = _run_case_in_subprocess(case, args.timeout)
          rows.append(row)
          shown = {k: v for k, v in row.items() if k != 'xla_buffer_bytes'}
          print(json.dumps(shown), flush=True)
          write_results(rows, info, command, args.out)


if __name__ == '__main__':
  main()
