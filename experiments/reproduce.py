"""Regenerates every results file in order: benchmarks, LRA tables, approximation, memory, speed.

  python -m experiments.reproduce --scale cpu --dry-run   # the plan, with time estimates
  python -m experiments.reproduce --scale cpu             # this 2-core machine (many hours)
  python -m experiments.reproduce --scale paper --dry-run # GPU/TPU: commands and estimates

Each step is one command (`STEPS`), run from the repository root; a step that
fails is reported at the end and the next one still runs. `--scale` picks the
LRA accuracy configs (configs/base.py: paper, cpu, tiny) and the LRA speed and
memory sizes; the attention benchmarks are the same commands at every scale.
experiments/results/blocked_tuning.md is a written record of experiments, not a
script's output, and is not regenerated.

Time estimates: for the LRA accuracy grid, `experiments.lra_accuracy`'s own (per
run: measured steps/s where a workdir has them, else FLOPs counted from the model
sizes at an assumed effective rate: this CPU calibrated on a measured ListOps run;
at `paper` scale one A100 at 30% of its TF32 peak); for the other steps the rough
figures of `STEPS`, wall times of this 2-core CPU judged from the size of each
step (cases x start-up, compilation and timed calls), not measured end to end.
"""

import argparse
import subprocess
import sys
import time

from experiments import lra_accuracy

ROOT = lra_accuracy.ROOT
RESULTS = 'experiments/results'
# Sizes of experiments.lra_speed_memory per scale: the paper's lengths and batch at
# `paper`; on this CPU lengths up to 4K at a batch the dense Transformer fits.
SPEED_MEMORY = {
    'paper': ['--lengths', '1024,2048,3072,4096,8192,16384', '--batch', '32'],
    'cpu': ['--lengths', '1024,2048,3072,4096', '--batch', '2'],
    'tiny': ['--lengths', '256,512', '--batch', '2'],
}
# Tasks of the accuracy grid per scale: Path-X (16K pixels) only at `paper` scale.
ACCURACY_TASKS = {'paper': 'all', 'cpu': 'listops,text,retrieval,image,pathfinder32',
                  'tiny': 'listops,pathfinder32'}


def steps(scale: str) -> list[tuple[str, list[str], float, str]]:
  """The steps at `scale`: (name, command, rough minutes on this CPU, what the guess rests on)."""
  bench = [sys.executable, '-m', 'efficient_attn.bench']
  module = lambda name: [sys.executable, '-m', f'experiments.{name}']
  return [
      ('attention_speed', bench + ['--attention', 'all', '--lengths', '1024,4096,16384'],
       60, '13 rows x 3 lengths x 2 modes, about 30 s each'),
      ('peers', bench + ['--peers', '--attention', 'full,lsh,linformer,performer,longformer',
                         '--lengths', '4096,16384', '--repeats', '3', '--no_reference'],
       30, '10 rows x 2 lengths x 2 modes (+causal), about 30 s each'),
      ('family_speed', bench + [
          '--attention', 'full,local,sparse,linear,bigbird,sinkhorn,routing,synthesizer,lsh,'
          'performer,longformer', '--lengths', '8192,16384', '--causal', 'no', '--modes',
          'fwd_bwd', '--repeats', '3', '--no_reference', '--out', f'{RESULTS}/family_speed'],
       25, '11 mechanisms x 2 lengths, about 1 min each'),
      ('full_vs_xla_4096', bench + ['--attention', 'full', '--lengths', '4096', '--repeats', '3',
                                    '--out', f'{RESULTS}/full_vs_xla_4096'],
       3, '4 cases at 4K'),
      ('linear_causal_4096', bench + [
          '--attention', 'linear', '--lengths', '4096', '--causal', 'both', '--modes', 'fwd_bwd',
          '--repeats', '5', '--no_reference', '--out', f'{RESULTS}/linear_causal_4096'],
       2, '2 cases at 4K'),
      ('attention_memory_65536', bench + [
          '--attention', 'lsh,linformer,performer,longformer', '--lengths', '65536', '--modes',
          'fwd_bwd', '--repeats', '0', '--timeout', '400', '--out',
          f'{RESULTS}/attention_memory_65536'],
       15, '4 cases at 64K, one call each'),
      ('lra_speed_memory', module('lra_speed_memory') + SPEED_MEMORY[scale] + [
          '--out', f'{RESULTS}/lra_speed_memory'],
       90, '12 rows x 4 lengths, a few training steps each'),
      ('lra_accuracy', module('lra_accuracy') + [
          '--scale', scale, '--tasks', ACCURACY_TASKS[scale], '--attention', 'all',
          '--seeds', '3', '--seeds_others', '1'],
       0, 'lra_accuracy --dry-run'),
      ('approximation', module('approximation') + ['--length', '2048', '--seeds', '3'],
       20, '9 mechanisms x 4 budgets x 3 seeds at 2K, forward only'),
      ('reversible_memory', module('reversible_memory') + ['--length', '4096', '--layers',
                                                            '1,12'],
       10, '8 cases, one process each'),
      ('train_speed', module('train_speed') + ['--config', 'configs/listops.py', '--scale',
                                               scale, '--steps', '10', '--warmup', '2'],
       10, '12 attentions x 12 steps plus compilation'),
      ('matmul_rate', module('matmul_rate') + ['--length', '4096', '--rounds', '5'],
       3, 'a few matmul shapes, 5 rounds'),
      ('data_speed', module('data_speed'), 10, 'generates 8192 Pathfinder images'),
      ('pathfinder_samples', module('pathfinder_samples') + ['--seed', '0'],
       1, 'a dozen images'),
  ]


def accuracy_minutes(command: list[str]) -> float:
  """Prints the accuracy grid's plan (`lra_accuracy --dry-run`); returns its minutes."""
  args = lra_accuracy.parse_args(command[3:] + ['--dry-run'])
  return lra_accuracy.dry_run(args) / 60


def main(argv: list[str] | None = None) -> int:
  """Runs the steps in order (or prints the plan); returns 1 if any step failed."""
  parser = argparse.ArgumentParser(prog='python -m experiments.reproduce', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--scale', default='cpu', choices=tuple(SPEED_MEMORY))
  parser.add_argument('--only', default=None,
                      help='comma-separated step names to run (default: all)')
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                      help='print the plan and time estimates, run nothing')
  args = parser.parse_args(argv)
  plan = steps(args.scale)
  names = [name for name, *_ in plan]
  if args.only:
    chosen = lra_accuracy.parse_names(args.only, tuple(names), tuple(names), '--only')
    plan = [step for step in plan if step[0] in chosen]
  if args.dry_run:
    total = 0.0
    for index, (name, command, minutes, basis) in enumerate(plan, 1):
      print(f'{index}. {name}: {lra_accuracy.shown(command)}')
      if name == 'lra_accuracy':
        minutes = accuracy_minutes(command)
        basis = 'the sum of the runs above'
      total += minutes
      print(f'   about {minutes:.0f} min ({basis}; rough)')
    print(f'about {total / 60:.1f} h in all, one step after another (rough estimates: see '
          '`python -m experiments.reproduce --help`)')
    return 0
  failed = []
  for index, (name, command, _, _) in enumerate(plan, 1):
    print(f'{index}/{len(plan)} {name}: {lra_accuracy.shown(command)}', flush=True)
    start = time.time()
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    print(f'{name}: exit code {code} after {(time.time() - start) / 60:.1f} min', flush=True)
    if code:
      failed.append(f'{name} (exit code {code})')
  if failed:
    print('failed: ' + ', '.join(failed))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
