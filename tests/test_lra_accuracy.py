"""experiments.lra_accuracy and experiments.reproduce at `tiny` scale: runs, collection, tables."""

import json
import pathlib
import sys
import textwrap

import numpy as np
import pytest

from efficient_attn.data import get_task
from experiments import lra_accuracy
from experiments import reproduce

# Stands in for launch.py: records each call, then fails (lsh), is killed as by the
# out-of-memory killer (linformer), hangs (performer seed 0) or writes the
# results.json of a finished run (accuracy 0.3 + 0.1 * seed).
FAKE_LAUNCH = '''
import json, os, pathlib, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
attention = args['config'].split(':')[1].split(',')[0]
workdir = pathlib.Path(args['workdir'])
with open(os.environ['FAKE_LAUNCH_CALLS'], 'a') as f:
  f.write(f"{attention} {args['config.seed']} {sorted(workdir.glob('checkpoints/*'))}\\n")
print('step 1/6 loss 2.3')
if attention == 'lsh':
  print('Traceback (most recent call last):', file=sys.stderr)
  print('ValueError: lsh went wrong', file=sys.stderr)
  sys.exit(1)
if attention == 'linformer':
  os.kill(os.getpid(), 9)
if attention == 'performer' and args['config.seed'] == '0':
  time.sleep(60)
accuracy = 0.3 + 0.1 * int(args['config.seed'])
(workdir / 'results.json').write_text(json.dumps(
    {'test': {'accuracy': accuracy}, 'best_step': 6, 'wall_seconds': 1.0}))
'''


@pytest.fixture
def fake_launch(tmp_path, monkeypatch):
  """Runs the grid with FAKE_LAUNCH; returns a function listing the calls so far."""
  script = tmp_path / 'fake_launch.py'
  script.write_text(FAKE_LAUNCH)
  calls = tmp_path / 'calls.txt'
  calls.touch()
  monkeypatch.setenv('FAKE_LAUNCH_CALLS', str(calls))
  monkeypatch.setattr(lra_accuracy, 'LAUNCH', (sys.executable, str(script)))
  return lambda: calls.read_text().splitlines()


def grid(tmp_path, prepared_dir, *flags):
  """The command line of a tiny grid in tmp_path."""
  return ['--scale', 'tiny', '--runs_dir', str(tmp_path / 'runs'), '--out',
          str(tmp_path / 'out'), '--override', f'data.data_dir={prepared_dir}', *flags]


def majority_rate(task: str, prepared_dir, **options) -> float:
  """The oracle: most frequent test label's share, counted here."""
  source = get_task(task, prepared_dir, 'test', **options).source
  counts = np.bincount([int(source[i]['targets']) for i in range(len(source))])
  return 100 * counts.max() / counts.sum()


def test_table_has_rows_spread_paper_majority_and_missing_data_then_collects(
    fake_launch, prepared_dir, tmp_path):
  argv = grid(tmp_path, prepared_dir, '--tasks', 'pathfinder32,text,listops',
              '--attention', 'full,linear', '--seeds', '2', '--seeds_others', '1', '--jobs', '2')
  assert lra_accuracy.main(argv) == 0
  # full is on the design card (2 seeds), linear is not (1); text has no data.
  assert sorted(fake_launch()) == sorted(
      f'{a} {s} []' for a, s in [('full', 0), ('full', 1), ('linear', 0)] * 2)
  md = (tmp_path / 'out.md').read_text()
  listops = majority_rate('listops', prepared_dir, config='tiny')
  pathfinder = majority_rate('pathfinder', prepared_dir, config='tiny')
  assert '| model | attention | ListOps | paper | Text | paper | Pathfinder | paper |' in md
  assert ('| Transformer | full | 35.00 [30.00, 40.00] (2/2) | 36.37 | no data | 64.27 | '
          '35.00 [30.00, 40.00] (2/2) | 71.40 |') in md
  assert '| Linear Trans. | linear | 30.00 (1/1) | 16.13 | no data | 65.90 | 30.00 (1/1) | 75.30 |' in md
  assert f'| majority class | | {listops:.2f} |  | - |  | {pathfinder:.2f} |  |' in md
  text_row = next(line for line in md.splitlines() if line.startswith('| text |'))
  assert 'missing' in text_row and 'aclImdb' in text_row and 'Download' in text_row
  rows = {(r['task'], r['attention']): r for r in json.loads((tmp_path / 'out.json').read_text())['rows']}
  assert rows[('listops', 'full')]['accuracies'] == pytest.approx([30.0, 40.0])
  assert rows[('listops', 'full')]['paper'] == 36.37
  assert ('text', 'full') not in rows

  results = tmp_path / 'runs/tiny/listops/full/seed1/results.json'
  mtime = results.stat().st_mtime_ns
  assert lra_accuracy.main(argv) == 0
  assert len(fake_launch()) == 6  # collected: nothing launched again
  assert results.stat().st_mtime_ns == mtime
  assert (tmp_path / 'out.md').read_text().split('## Tasks')[1] == md.split('## Tasks')[1]


def test_unfinished_run_is_relaunched_and_failures_are_reported(fake_launch, prepared_dir,
                                                                tmp_path, capsys):
  argv = grid(tmp_path, prepared_dir, '--tasks', 'listops', '--attention',
              'full,lsh,linformer,performer', '--seeds', '2', '--timeout', '1')
  unfinished = tmp_path / 'runs/tiny/listops/full/seed0'
  (unfinished / 'checkpoints' / '3').mkdir(parents=True)
  assert lra_accuracy.main(argv + ['--dry-run']) == 0
  plan = capsys.readouterr().out
  assert 'listops full seed 0: resumable from step 3' in plan
  assert 'listops lsh seed 0: new' in plan and '--config.seed=0' in plan
  assert fake_launch() == []

  assert lra_accuracy.main(argv) == 1
  calls = fake_launch()
  assert f"full 0 [PosixPath('{unfinished}/checkpoints/3')]" in calls  # same workdir
  md = (tmp_path / 'out.md').read_text()
  assert '| Transformer | full | 35.00 [30.00, 40.00] (2/2) | 36.37 |' in md
  assert '| Reformer | lsh | failed | 37.27 |' in md
  assert '| Linformer | linformer | out of memory | 35.70 |' in md
  assert '| Performer | performer | 40.00 (1/2; seed 0 timed out) | 18.01 |' in md
  assert 'listops lsh seed 1: exit code 1' in md and 'ValueError: lsh went wrong' in md
  assert 'listops linformer seed 0: killed by signal 9 (out of memory?)' in md
  assert 'listops performer seed 0: timed out after 1 s' in md
  assert (tmp_path / 'runs/tiny/listops/lsh/seed0/error.txt').exists()

  assert lra_accuracy.main(argv + ['--dry-run']) == 0
  plan = capsys.readouterr().out
  assert 'listops full seed 0: done' in plan
  assert 'listops lsh seed 0: new (last attempt: exit code 1)' in plan


def test_real_run_is_collected_and_its_speed_estimates_the_rest(prepared_dir, tmp_path, capsys,
                                                                monkeypatch):
  # One device: launch.py compiles faster.
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  argv = grid(tmp_path, prepared_dir, '--tasks', 'listops', '--attention', 'full',
              '--seeds', '1', '--override', 'train.steps=2')
  assert lra_accuracy.main(argv) == 0
  workdir = tmp_path / 'runs/tiny/listops/full/seed0'
  accuracy = json.loads((workdir / 'results.json').read_text())['test']['accuracy']
  assert 'step 2/2' in (workdir / 'launch.log').read_text()
  assert f'| Transformer | full | {100 * accuracy:.2f} (1/1) | 36.37 |' in (
      tmp_path / 'out.md').read_text()
  # Another config in the same workdir is neither collected nor rerun.
  assert lra_accuracy.main(argv + ['--override', 'train.steps=3']) == 1
  assert "stale: its config has train.steps=2 (planned 3)" in (tmp_path / 'out.md').read_text()
  assert (workdir / 'launch.log').read_text().count('=== ') == 1
  (workdir / 'results.json').unlink()
  assert lra_accuracy.main(argv + ['--dry-run', '--seeds', '2']) == 0
  plan = capsys.readouterr().out
  assert 'listops full seed 0: resumable from step 2; about 0.0 min (measured' in plan
  assert 'listops full seed 1: new; about' in plan and 'measured in seed0' in plan


@pytest.mark.parametrize('flags,message', [
    (['--tasks', 'listops,imdb'], "--tasks: 'imdb' does not exist; available: all, listops"),
    (['--attention', 'flash'], "--attention: 'flash' does not exist; available: all, full"),
    (['--seeds', '0'], '--seeds=0 must be at least 1'),
    (['--jobs', '0'], '--jobs=0 must be at least 1'),
    (['--override', 'train.steps'], "--override 'train.steps' must be 'key=value'"),
])
def test_bad_arguments_are_named(flags, message):
  with pytest.raises(ValueError, match=message):
    lra_accuracy.parse_args(flags)


def test_bad_override_names_the_key(tmp_path):
  for override, message in (('train.stepz=3', "no key 'stepz' in the config; available: .*"
                             'steps'),
                            ('train.steps=many', 'train.steps=many')):
    args = lra_accuracy.parse_args(['--scale', 'tiny', '--tasks', 'listops', '--dry-run',
                                    '--runs_dir', str(tmp_path), '--override', override])
    with pytest.raises(ValueError, match=message):
      lra_accuracy.plan(args)


def test_reproduce_plan_gives_commands_and_flop_estimates(capsys):
  assert reproduce.main(['--scale', 'paper', '--dry-run', '--only',
                         'approximation,lra_accuracy']) == 0
  out = capsys.readouterr().out
  assert '1. lra_accuracy:' in out and '2. approximation:' in out and 'about' in out
  assert 'python launch.py --config=configs/pathfinder.py:performer,paper,128' in out
  assert 'GFLOP/step' in out and 'A100' in out and 'Estimates, not measurements' in out
  with pytest.raises(ValueError, match="--only: 'bench' does not exist"):
    reproduce.main(['--only', 'bench', '--dry-run'])
  # Long inputs cost dense attention quadratically, a windowed one linearly.
  flops = {(name, n): lra_accuracy.step_flops(lra_accuracy.task_config(
      'listops', name, 'tiny', [('data.seq_len', str(n))])) for name in ('full', 'longformer')
           for n in (1023, 4095)}
  assert flops[('full', 4095)] / flops[('full', 1023)] > 10
  assert flops[('longformer', 4095)] / flops[('longformer', 1023)] == pytest.approx(4, rel=0.01)
