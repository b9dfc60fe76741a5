"""Speed and memory of every attention mechanism, each case in its own process.

Usage:
  python -m efficient_attn.bench --attention all --lengths 1024,4096,16384
  python -m efficient_attn.bench --peers --lengths 4096,16384   # PyTorch peers beside ours

Each case (mechanism, length, mode, causal) runs in a fresh interpreter, which
first compiles the step (`fwd`: the output; `fwd_bwd`: the gradients of
sum(output) w.r.t. q, k, v and the parameters), then measures it:
- time: the min wall time over `--repeats` calls (each to `block_until_ready`),
  after one untimed warm-up call;
- step peak: the peak resident set during the warm-up and timed calls minus the
  resident set just before them (compilation, inputs and parameters excluded).
  The kernel's peak counter (VmHWM) is reset by writing "5" to
  /proc/self/clear_refs;
- XLA bytes: `compiled.memory_analysis()`, temp + output + argument bytes, the
  buffers XLA plans for the step (not for PyTorch peers).
With `--peers` the PyTorch packages a user would pick instead run in the same
harness on the same shapes (see `PEERS`; install requirements-peers.txt), and
the table puts each mechanism beside its peer with peer time / our time.
Results go to `experiments/results/<name>.md` and `.json` with the machine, the
load average, library versions and the command.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

# Reference row: jax's own dot-product attention, not a registered mechanism.
JAX_REFERENCE = 'jax.nn.dot_product_attention'
# Project row: MultiHeadAttention with Linformer, projections included (peer of the
# linformer package, which has them).
MHA_LINFORMER = 'mha-linformer'

# Options each mechanism is benchmarked with (the settings of the paper tables).
BENCH_OPTIONS = {
    'full': {'backend': 'blocked'},
    'lsh': {'chunk_len': 64, 'n_hashes': 2, 'n_chunks_after': 0},
    'linformer': {'k': 256},
    'performer': {'num_features': 256},
    'longformer': {'window': 256},
    'sinkhorn': {'block_len': 50},
    'bigbird': {'block_len': 64, 'num_random_blocks': 3},
    'linear': {},
    'synthesizer': {'rank': 32},
    'local': {'block_len': 50},
    # LRA's fixed pattern with l = 128 and the paper's smallest c = 8 (of 8, 16, 32);
    # LRA's c = 32 would read a quarter of all keys at n = 16K.
    'sparse': {'pattern': 'fixed', 'block_len': 128, 'summary_len': 8},
    MHA_LINFORMER: {'k': 256},
}


def bench_options(name: str, length: int) -> dict:
  """The options of project row `name` at sequence length `length`."""
  options = dict(BENCH_OPTIONS.get(name, {}))
  if name in ('linformer', MHA_LINFORMER, 'synthesizer'):
    options['max_len'] = length
  if name == 'lsh':
    # n / chunk_len buckets, as reformer-pytorch (the paper and trax use twice that).
    options['n_buckets'] = max(2, length // options['chunk_len'] // 2 * 2)
  if name == 'routing':
    # sqrt(n) clusters of sqrt(n) tokens, the paper's choice.
    options['num_clusters'] = max(1, round(length ** 0.5))
  return options


# PyTorch peers: row name -> the pip package, the module it imports, our row it is
# compared with, the causal settings it runs, and how it differs from ours.
PEERS = {
    'pt:sdpa': {
        'package': 'torch', 'module': 'torch', 'ours': 'full', 'causal': (False, True),
        'note': 'torch.nn.functional.scaled_dot_product_attention (CPU flash kernel), '
                'is_causal as ours; exact, the same math.'},
    'pt:performer-pytorch': {
        'package': 'performer-pytorch', 'module': 'performer_pytorch', 'ours': 'performer',
        'causal': (False,),
        'note': 'FastAttention(dim_heads=64, nb_features=256): FAVOR+ with positive '
                'orthogonal random features, fixed as ours (redraw="fixed").'},
    'pt:reformer-pytorch': {
        'package': 'reformer-pytorch', 'module': 'reformer_pytorch', 'ours': 'lsh',
        'causal': (False,),
        'note': 'LSHAttention(bucket_size=64, n_hashes=2) on [batch*heads, n, 64]: shared QK '
                '(k unused) and chunks of 64 that look one chunk back, as ours with '
                'n_chunks_after=0. It differs: both hash rounds are sorted into one '
                'sequence and chunked together (a chunk can span two rounds; the first '
                'looks back at the last). Both hash into n/64 buckets here (our default, as '
                'the paper and trax, is 2n/64).'},
    'pt:local-attention': {
        'package': 'local-attention', 'module': 'local_attention', 'ours': 'longformer',
        'causal': (False,),
        'note': 'LocalAttention(window_size=256, look_backward=1, look_forward=1, '
                'exact_windowsize=True): query i sees |i - j| <= 256, as ours; no rotary '
                'embedding, and no global tokens on either side.'},
    'pt:linformer': {
        'package': 'linformer', 'module': 'linformer', 'ours': MHA_LINFORMER,
        'causal': (False,),
        'note': 'LinformerSelfAttention(dim=512, seq_len=n, k=256, heads=8) on x [batch, n, '
                '512], with its q/k/v/out and length projections, against ours '
                'MultiHeadAttention(num_heads=8, in_features=512, attention="linformer"); '
                'gradients w.r.t. x and all parameters. Its q/k/v projections have no bias, '
                'ours have.'},
}

# Forward+backward cases whose XLA buffers exceed this are reported, not run.
MEMORY_BUDGET_BYTES = 20 * 2**30
# A timed call longer than this ends the repeats.
LONG_CALL_SECONDS = 20.0


def status_bytes(field: str) -> int:
  """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise ValueError(f'no {field} in /proc/self/status')


def reset_peak_rss() -> None:
  """Resets this process's peak resident set (VmHWM) to its current one (Linux)."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def _project_case(name: str, length: int, causal: bool, batch: int, heads: int,
                  head_dim: int):
  """This project's module, its inputs and its call arguments for one case."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  import efficient_attn as ea
  from efficient_attn.attention.full import xla_attention

  class JaxReference(nnx.Module):
    """`jax.nn.dot_product_attention` as a module."""

    def __call__(self, q, k, v, causal=False):
      return xla_attention(q, k, v, causal=causal)

  keys = jax.random.split(jax.random.key(0), 3)
  call_kwargs = {'causal': causal}
  options = bench_options(name, length)
  if name == MHA_LINFORMER:
    features = heads * head_dim
    module = ea.MultiHeadAttention(
        num_heads=heads, in_features=features, attention='linformer',
        attention_options=options, rngs=nnx.Rngs(0))
    inputs = (jax.random.normal(keys[0], (batch, length, features), jnp.float32),)
    return module, inputs, call_kwargs
  if name == JAX_REFERENCE:
    module = JaxReference()
  else:
    module = ea.make_attention(name, rngs=nnx.Rngs(0), **options)
  inputs = tuple(jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32)
                 for key in keys)
  return module, inputs, call_kwargs


def _project_step(name: str, length: int, mode: str, causal: bool, batch: int, heads: int,
                  head_dim: int):
  """Compiles a project case; returns a call running it to completion, and XLA's bytes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  module, inputs, call_kwargs = _project_case(name, length, causal, batch, heads, head_dim)
  graphdef, params, state = nnx.split(module, nnx.Param, ...)

  def forward(params, state, *inputs):
    return nnx.merge(graphdef, params, state)(*inputs, **call_kwargs)

  def gradients(params, state, *inputs):
    # nnx.grad, so that mechanisms drawing random numbers may advance their rng state.
    loss = lambda module, *inputs: jnp.sum(module(*inputs, **call_kwargs).astype(jnp.float32))
    argnums = tuple(range(len(inputs) + 1))
    return nnx.grad(loss, argnums=argnums)(nnx.merge(graphdef, params, state), *inputs)

  args = (params, state, *inputs)
  jax.block_until_ready(args)
  compiled = jax.jit(forward if mode == 'fwd' else gradients).lower(*args).compile()
  stats = compiled.memory_analysis()
  xla_bytes = (stats.temp_size_in_bytes + stats.output_size_in_bytes +
               stats.argument_size_in_bytes)
  return lambda: jax.block_until_ready(compiled(*args)), xla_bytes


def _peer_step(name: str, length: int, mode: str, causal: bool, batch: int, heads: int,
               head_dim: int):
  """A PyTorch peer's step (see `PEERS`) as a call that runs it to completion."""
  import torch
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  shape = (batch, heads, length, head_dim)
  q, k, v = (torch.randn(shape) for _ in range(3))
  module = None
  if name == 'pt:sdpa':
    import torch.nn.functional as F
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    inputs = (q, k, v)
  elif name == 'pt:performer-pytorch':
    from performer_pytorch import FastAttention
    fn = module = FastAttention(dim_heads=head_dim, nb_features=256, causal=causal)
    inputs = (q, k, v)
  elif name == 'pt:reformer-pytorch':
    from reformer_pytorch import LSHAttention
    module = LSHAttention(bucket_size=64, n_hashes=2, causal=causal)
    fn = lambda qk, v: module(qk, v)[0]
    # Heads merged into the batch, as its LSHSelfAttention does; keys are the queries.
    inputs = (q.reshape(batch * heads, length, head_dim),
              v.reshape(batch * heads, length, head_dim))
  elif name == 'pt:local-attention':
    from local_attention import LocalAttention
    fn = module = LocalAttention(window_size=256, causal=causal, look_backward=1,
                                 look_forward=0 if causal else 1, exact_windowsize=True)
    inputs = (q, k, v)
  elif name == 'pt:linformer':
    from linformer import LinformerSelfAttention
    if causal:
      raise ValueError('linformer has no causal form')
    fn = module = LinformerSelfAttention(dim=heads * head_dim, seq_len=length, k=256,
                                         heads=heads)
    inputs = (torch.randn(batch, length, heads * head_dim),)
  else:
    raise ValueError(f'unknown peer {name!r}; available: {", ".join(PEERS)}')
  params = [] if module is None else list(module.parameters())
  for x in inputs:
    x.requires_grad_(True)

  def forward():
    with torch.no_grad():
      return fn(*inputs)

  def gradients():
    return torch.autograd.grad(fn(*inputs).sum(), list(inputs) + params)

  return forward if mode == 'fwd' else gradients


def min_time(call, repeats: int, clock=time.perf_counter) -> float:
  """Min wall time of `call()` over `repeats` timed calls, after one untimed warm-up.

  The repeats stop early after a call longer than LONG_CALL_SECONDS; at least one
  call is timed.
  """
  call()
  times = []
  for _ in range(max(repeats, 1)):
    start = clock()
    call()
    times.append(clock() - start)
    if times[-1] > LONG_CALL_SECONDS:
      break
  return min(times)


def run_case(name: str, length: int, mode: str, causal: bool, batch: int, heads: int,
             head_dim: int, repeats: int) -> dict:
  """Times one (mechanism or peer, length, mode) case in this process; mode: fwd, fwd_bwd."""
  result = {'attention': name, 'length': length, 'mode': mode, 'causal': causal}
  shape = dict(length=length, mode=mode, causal=causal, batch=batch, heads=heads,
               head_dim=head_dim)
  if name in PEERS:
    call = _peer_step(name, **shape)
  else:
    call, result['xla_bytes'] = _project_step(name, **shape)
    if result['xla_bytes'] > MEMORY_BUDGET_BYTES:
      result['error'] = f'out of memory: needs {result["xla_bytes"] / 2**30:.1f} GiB of buffers'
      return result
  before = status_bytes('VmRSS')
  reset_peak_rss()
  result['seconds'] = min_time(call, repeats)
  result['peak_bytes'] = status_bytes('VmHWM') - before
  return result


def _error_row(case: dict, error: str) -> dict:
  """The result row of a case that gave no measurement."""
  return {'attention': case['name'], 'length': case['length'], 'mode': case['mode'],
          'causal': case['causal'], 'error': error}


def _run_case_in_subprocess(case: dict, timeout: float) -> dict:
  """Runs `run_case(**case)` in a fresh interpreter and returns its result."""
  command = [sys.executable, '-m', 'efficient_attn.bench', '--case', json.dumps(case)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return _error_row(case, f'timed out after {timeout:.0f} s')
  lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
  if done.returncode != 0 or not lines:
    tail = (done.stderr.strip().splitlines() or ['killed (out of memory?)'])[-1]
    return _error_row(case, tail[:200])
  return json.loads(lines[-1])


def missing_peer_packages(find_spec=importlib.util.find_spec) -> list[str]:
  """The pip packages of `PEERS` that cannot be imported here."""
  packages = {peer['module']: peer['package'] for peer in PEERS.values()}
  return [package for module, package in packages.items() if find_spec(module) is None]


def machine_info(peers: bool = False) -> dict:
  """CPU, core count, memory, jax backend and library versions (with `peers`, theirs too)."""
  import jax
  cpu = platform.processor() or 'unknown'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  memory_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  packages = ['jax', 'jaxlib', 'flax', 'numpy']
  if peers:
    packages += list(dict.fromkeys(peer['package'] for peer in PEERS.values()))
  versions = {'python': platform.python_version()}
  versions.update({p: importlib.metadata.version(p) for p in packages})
  return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gib': round(memory_gib, 1),
          'backend': jax.default_backend(), 'versions': versions}


def _format_seconds(row: dict | None) -> str:
  if row is None:
    return '-'
  if 'error' in row:
    return 'OOM' if 'memory' in row['error'] else 'failed'
  return f'{row["seconds"]:.3f}'


def _format_mb(row: dict | None, field: str) -> str:
  if row is None or field not in row:
    return '-'
  return f'{row[field] / 1e6:.0f}'


def _ratio(numerator: dict | None, denominator: dict | None) -> str:
  """numerator / denominator seconds, or '-' when either did not run."""
  if not (numerator and denominator and 'seconds' in numerator and 'seconds' in denominator):
    return '-'
  return f'{numerator["seconds"] / denominator["seconds"]:.2f}'


def _options(name: str, length: int) -> str:
  """The options of a project row at `length`, as `key=value, ...` (max_len left out)."""
  options = bench_options(name, length)
  options.pop('max_len', None)
  return ', '.join(f'{k}={v}' for k, v in options.items()) or '-'


def _header(info: dict, command: str, title: str) -> list[str]:
  """Title, command, machine, load and the column meanings shared by both tables."""
  load = lambda key: ', '.join(f'{x:.2f}' for x in info[key])
  versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items())
  return [
      f'# {title}', '',
      f'Command: `{command}`', '',
      f'Machine: {info["cpu"]}, {info["cores"]} cores, {info["memory_gib"]} GiB, jax backend '
      f'{info["backend"]}. '
      f'Load average (1, 5, 15 min) at start {load("load_start")}, at end {load("load_end")}.',
      '', f'Libraries: {versions}.', '',
      f'Batch {info["batch"]}, {info["heads"]} heads, head_dim {info["head_dim"]}, float32; '
      'each case in its own process. fwd: the output; fwd+bwd: the gradients of sum(output) '
      'w.r.t. the inputs and the parameters. Times in seconds: the min over '
      f'{info["repeats"]} calls after an untimed warm-up call. "step MB": the peak resident '
      'set during the warm-up and timed calls minus the resident set just before them '
      '(compilation, inputs and parameters excluded), fwd+bwd. "XLA MB": XLA\'s memory '
      'analysis of the compiled fwd+bwd step, temp + output + argument buffers. '
      'MB = 1e6 bytes.', '',
  ]


def write_results(rows: list[dict], info: dict, command: str, out_stem: str,
                  baseline: str = 'full') -> None:
  """Writes the result rows as `<out_stem>.json` and a markdown table `<out_stem>.md`.

  Args:
    rows: results of `run_case`, ours and peers.
    info: `machine_info()` with batch, heads, head_dim, repeats, load_start, load_end.
    command: the command line that produced the rows.
    out_stem: output path without extension.
    baseline: the mechanism whose fwd+bwd time the "x baseline" column divides.
  """
  os.makedirs(os.path.dirname(out_stem) or '.', exist_ok=True)
  with open(out_stem + '.json', 'w') as f:
    json.dump({'command': command, 'machine': info, 'rows': rows}, f, indent=1)
  by_key = {(r['attention'], r['causal'], r['length'], r['mode']): r for r in rows}
  lengths = sorted({r['length'] for r in rows})
  names = list(dict.fromkeys((r['attention'], r['causal']) for r in rows
                             if r['attention'] not in PEERS))
  peers = list(dict.fromkeys((r['attention'], r['causal']) for r in rows
                             if r['attention'] in PEERS))
  title = 'Attention speed and memory' + (', beside PyTorch peers' if peers else '')
  lines = _header(info, command, title)
  if peers:
    lines += [
        '## Beside PyTorch peers', '',
        '"peer / ours" is the peer\'s time over ours, in the same run (>1: ours is faster). '
        'Peers run eagerly with torch.set_num_threads(cores): fwd under torch.no_grad, '
        'fwd+bwd through torch.autograd.grad; "XLA MB" does not apply to them. PyTorch '
        'slows down far more than XLA when the machine is busy: check the load above.',
        '',
        '| ours | peer | causal | length | ours fwd s | peer fwd s | peer / ours fwd | '
        'ours fwd+bwd s | peer fwd+bwd s | peer / ours fwd+bwd | ours step MB | '
        'peer step MB |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for peer, causal in peers:
      ours = PEERS[peer]['ours']
      for length in lengths:
        get = lambda name, mode: by_key.get((name, causal, length, mode))
        if get(peer, 'fwd') is None and get(peer, 'fwd_bwd') is None:
          continue
        lines.append(
            f'| {ours} | {peer} | {"yes" if causal else "no"} | {length} | '
            f'{_format_seconds(get(ours, "fwd"))} | {_format_seconds(get(peer, "fwd"))} | '
            f'{_ratio(get(peer, "fwd"), get(ours, "fwd"))} | '
            f'{_format_seconds(get(ours, "fwd_bwd"))} | '
            f'{_format_seconds(get(peer, "fwd_bwd"))} | '
            f'{_ratio(get(peer, "fwd_bwd"), get(ours, "fwd_bwd"))} | '
            f'{_format_mb(get(ours, "fwd_bwd"), "peak_bytes")} | '
            f'{_format_mb(get(peer, "fwd_bwd"), "peak_bytes")} |')
    lines += ['', 'Peers, and where they differ from ours:', '']
    lines += [f'- `{peer}` (beside `{PEERS[peer]["ours"]}`): {PEERS[peer]["note"]}'
              for peer in dict.fromkeys(p for p, _ in peers)]
    lines += ['', '## Every row of this project', '']
  lines += [
      f'"x {baseline}": the fwd+bwd time of `{baseline}` over this row\'s, same length and '
      'causality, same run.', '',
      f'| attention | options | causal | length | fwd s | fwd+bwd s | x {baseline} | '
      'step MB | XLA MB |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for name, causal in names:
    for length in lengths:
      fwd = by_key.get((name, causal, length, 'fwd'))
      fwd_bwd = by_key.get((name, causal, length, 'fwd_bwd'))
      if fwd is None and fwd_bwd is None:
        continue
      base_row = by_key.get((baseline, causal, length, 'fwd_bwd'))
      lines.append(f'| {name} | {_options(name, length)} | {"yes" if causal else "no"} | {length} | '
                   f'{_format_seconds(fwd)} | {_format_seconds(fwd_bwd)} | '
                   f'{_ratio(base_row, fwd_bwd)} | {_format_mb(fwd_bwd, "peak_bytes")} | '
                   f'{_format_mb(fwd_bwd, "xla_bytes")} |')
  with open(out_stem + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')


def plan_cases(names, causals, lengths, modes, peers: bool) -> list[tuple]:
  """The (name, causal, length, mode) cases to run, in order.

  Our rows for every name, causality, length and mode (no causal Linformer); with
  `peers`, each peer case of `PEERS` whose counterpart is in `names` comes right
  after its counterpart's case (added when missing), so a pair is measured close
  in time.
  """
  cases = [(name, causal, length, mode) for causal in causals for name in names
           if not (causal and name in ('linformer', MHA_LINFORMER))
           for length in lengths for mode in modes]
  if not peers:
    return cases
  for peer, spec in PEERS.items():
    if spec['ours'] not in names:
      continue
    for causal in spec['causal']:
      for length in lengths:
        for mode in modes:
          ours = (spec['ours'], causal, length, mode)
          if ours not in cases:
            cases.append(ours)
          cases.insert(cases.index(ours) + 1, (peer, causal, length, mode))
  return cases


def main(argv=None) -> None:
  """Parses flags and runs every requested case, each in a subprocess."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--attention', default='all',
                      help='comma-separated mechanism names, "all" for every registered '
                      f'one, "{MHA_LINFORMER}" for MultiHeadAttention with linformer; '
                      f'"{JAX_REFERENCE}" is added as a reference unless --no_reference')
  parser.add_argument('--no_reference', action='store_true',
                      help=f'leave out the {JAX_REFERENCE} rows (slow at long lengths)')
  parser.add_argument('--peers', action='store_true',
                      help='also run the PyTorch peers (requirements-peers.txt) of the '
                      'chosen mechanisms, see PEERS')
  parser.add_argument('--lengths', default='1024,4096,16384')
  parser.add_argument('--causal', default='no', choices=['no', 'yes', 'both'])
  parser.add_argument('--modes', default='fwd,fwd_bwd')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--timeout', type=float, default=900.0, help='seconds per case')
  parser.add_argument('--out', default=None,
                      help='output path without extension (default '
                      'experiments/results/attention_speed, or .../peers with --peers)')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.case:
    case = json.loads(args.case)
    print(json.dumps(run_case(**case)), flush=True)
    return

  load_start = os.getloadavg()
  import efficient_attn as ea
  registered = ea.available_attentions()
  names = registered if args.attention == 'all' else tuple(args.attention.split(','))
  for name in names:
    if name not in registered + (JAX_REFERENCE, MHA_LINFORMER):
      parser.error(f'--attention: unknown attention {name!r}; available: '
                   f'{", ".join(registered)}, {MHA_LINFORMER}, all')
  if args.peers:
    missing = missing_peer_packages()
    if missing:
      parser.error(f'--peers needs {", ".join(missing)}, not installed here; install the '
                   'peers with `pip install -r requirements-peers.txt`')
    if 'linformer' in names and MHA_LINFORMER not in names:
      names = names + (MHA_LINFORMER,)
  if JAX_REFERENCE not in names and not args.no_reference:
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

  cases = plan_cases(names, causals, lengths, modes, args.peers)
  out = args.out or ('experiments/results/peers' if args.peers
                     else 'experiments/results/attention_speed')
  command = 'python -m efficient_attn.bench ' + ' '.join(sys.argv[1:] if argv is None else argv)
  info = {**machine_info(args.peers), 'batch': args.batch, 'heads': args.heads,
          'head_dim': args.head_dim, 'repeats': args.repeats, 'load_start': load_start}
  rows = []
  for name, causal, length, mode in cases:
    case = dict(name=name, length=length, mode=mode, causal=causal, batch=args.batch,
                heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
    row = _run_case_in_subprocess(case, args.timeout)
    rows.append(row)
    print(json.dumps(row), flush=True)
    info['load_end'] = os.getloadavg()
    write_results(rows, info, command, out)


if __name__ == '__main__':
  main()
