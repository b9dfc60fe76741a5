"""Tests of the LRA Table 2 script: configs, limits, tables beside the paper, arguments."""

import json

import pytest

from experiments import lra_speed_memory as lra

GB = lra.GB


def table(markdown: str, heading: str) -> dict:
  """The table under `## heading` as {model: {column: cell}}."""
  section = markdown.split(f'## {heading}\n', 1)[1].split('\n## ', 1)[0]
  lines = [line for line in section.splitlines() if line.startswith('|')]
  split = lambda line: [cell.strip() for cell in line.strip('|').split('|')]
  columns = split(lines[0])
  return {cells[0]: dict(zip(columns, cells)) for cells in map(split, lines[2:])}


def ok(row, length, steps_per_second, xla_gb, step_gb=0.5):
  return {'row': row, 'length': length, 'status': 'ok',
          'steps_per_second': steps_per_second, 'seconds': 1 / steps_per_second,
          'xla_bytes': xla_gb * GB, 'peak_bytes': step_gb * GB}


INFO = {'command': 'python -m experiments.lra_speed_memory --lengths 1024,4096',
        'cpu': 'cpu', 'cores': 2, 'memory_gib': 23.0, 'backend': 'cpu',
        'versions': {'jax': '0'}, 'load_start': (1.0, 1.0, 1.0), 'load_end': (2.0, 2.0, 2.0),
        'scale': 'paper', 'batch': 2, 'steps': 3, 'timeout': 60.0, 'memory_limit': 8.0,
        'model': '4 layers'}
RESULTS = [
    ok('full-dense', 1024, 2.0, 1.0), ok('full-blocked', 1024, 4.0, 0.5),
    ok('performer', 1024, 10.0, 0.2), ok('routing', 1024, 5.0, 0.3),
    {'row': 'full-dense', 'length': 4096, 'status': 'out of memory', 'xla_bytes': 20 * GB,
     'error': 'XLA plans 20.0 GB of buffers'},
    ok('full-blocked', 4096, 1.0, 2.0),
    {'row': 'performer', 'length': 4096, 'status': 'timeout', 'error': 'no result after 60 s'},
]


def test_tables_put_the_paper_beside_ours():
  text = lra.markdown(RESULTS, INFO)
  steps = table(text, 'Steps per second')
  assert list(steps) == ['Transformer (dense)', 'Transformer (blocked)', 'Performer',
                         'Routing Trans.']
  assert steps['Performer']['1K ours'] == '10.00'
  assert steps['Performer']['1K paper'] == '9.5'
  assert steps['Performer']['4K paper'] == '8.0'
  assert steps['Transformer (dense)']['4K paper'] == '1.4'
  # The blocked kernel and Routing are not in the paper's table.
  assert steps['Transformer (blocked)']['1K paper'] == '-'
  assert steps['Routing Trans.']['4K ours'] == '-'  # not run
  relative = table(text, 'Relative to the Transformer')
  assert relative['Performer']['1K x dense'] == '5.00'
  assert relative['Performer']['1K x blocked'] == '2.50'
  assert relative['Performer']['1K mem / dense'] == '0.20'
  assert relative['Performer']['paper 4K x Transformer'] == '5.71'
  assert relative['Performer']['paper 4K mem / Transformer'] == f'{1.06 / 9.48:.2f}'
  assert relative['Transformer (blocked)']['4K x dense'] == '-'  # dense ran out of memory
  memory = table(text, 'Peak memory (GB = 1e9 bytes)')
  assert memory['Transformer (blocked)']['4K XLA'] == '2.00'
  assert memory['Transformer (blocked)']['4K step'] == '0.50'
  assert memory['Transformer (dense)']['1K paper'] == '0.85'
  assert 'TPU v3' in text and 'train step alone on CPU' in text
  assert INFO['command'] in text and 'at start 1.00' in text and 'at end 2.00' in text
  # Options of every row, the timed-out Performer's too.
  options = table(text, 'Attention options')
  assert options['Performer']['options'] == 'num_features=256'
  assert options['Transformer (dense)']['options'] == 'backend=dense'


def test_cases_over_a_limit_are_reported_never_as_numbers():
  text = lra.markdown(RESULTS, INFO)
  steps = table(text, 'Steps per second')
  memory = table(text, 'Peak memory (GB = 1e9 bytes)')
  assert steps['Performer']['4K ours'] == 'timeout'
  assert memory['Performer']['4K XLA'] == 'timeout'
  assert steps['Transformer (dense)']['4K ours'] == 'out of memory'
  # Not even the XLA plan of a case that did not run.
  assert memory['Transformer (dense)']['4K XLA'] == 'out of memory'
  assert '- Performer at 4096: timeout (no result after 60 s)' in text
  assert '- Transformer (dense) at 4096: out of memory (XLA plans 20.0 GB' in text


def test_case_config_sets_the_length_batch_and_options():
  config = lra.case_config('linformer', 2048, 'paper', 4)
  assert (config.data.seq_len, config.data.batch_size) == (2048, 4)
  assert (config.model.num_layers, config.model.emb_dim, config.model.num_heads,
          config.model.mlp_dim) == (4, 256, 4, 1024)
  # The CLS token is one more position for the attention.
  assert config.model.attention_options.max_len == 2049
  assert config.model.attention_options.k == 256
  assert dict(lra.case_config('full-dense', 1024, 'paper', 2).model.attention_options) == {
      'backend': 'dense'}
  assert lra.case_config('full-blocked', 1024, 'tiny', 2).model.num_layers == 1


def test_main_runs_a_case_and_writes_every_file(tmp_path):
  out = tmp_path / 'speed'
  lra.main(['--attention', 'local', '--lengths', '32', '--scale', 'tiny', '--batch', '2',
            '--steps', '1', '--timeout', '120', '--out', str(out)])
  data = json.loads((tmp_path / 'speed.json').read_text())
  [row] = data['rows']
  assert row['status'] == 'ok', row
  assert row['steps_per_second'] > 0 and row['xla_bytes'] > 0 and row['peak_bytes'] >= 0
  assert row['options']['block_len'] == 4
  assert data['machine']['batch'] == 2 and 'load_end' in data['machine']
  steps = table((tmp_path / 'speed.md').read_text(), 'Steps per second')
  assert steps['Local Attention']['32 ours'] == f'{row["steps_per_second"]:.2f}'
  assert steps['Local Attention']['32 paper'] == '-'
  assert (tmp_path / 'speed.png').stat().st_size > 0


CASE = dict(row='local', length=32, batch=2, scale='tiny', steps=1)


def test_a_case_past_the_time_limit_is_a_timeout():
  result = lra.run_in_subprocess({**CASE, 'memory_limit': 8.0}, timeout=0.5)
  assert result['status'] == 'timeout' and 'steps_per_second' not in result


def test_a_process_past_the_memory_limit_is_out_of_memory():
  # The interpreter with jax loaded holds more than 50 MB before any compilation.
  result = lra.run_in_subprocess({**CASE, 'memory_limit': 0.05}, timeout=120)
  assert result['status'] == 'out of memory', result
  assert 'resident set' in result['error'] and 'steps_per_second' not in result


def test_progress_check_finds_memory_over_the_limit_and_stalls():
  assert lra.check_progress(int(0.5 * GB), 1.0, 10.0, 30.0) is None
  status, error = lra.check_progress(int(1.5 * GB), 1.0, 10.0, 30.0)
  assert status == 'out of memory' and '1.5 GB' in error
  # Idle (every thread waiting) for the whole window: stalled; a shorter window is not judged.
  assert lra.check_progress(int(0.5 * GB), 1.0, 0.1, 30.0)[0] == 'stalled'
  assert lra.check_progress(int(0.5 * GB), 1.0, 0.1, 10.0) is None


def test_a_stalled_case_is_run_again(monkeypatch):
  outputs = iter([{'status': 'stalled'}, {'status': 'stalled'}, {'status': 'ok'}])
  monkeypatch.setattr(lra, '_run_once', lambda case, timeout: next(outputs))
  assert lra.run_in_subprocess(CASE, 1.0) == {'status': 'ok', 'attempts': 3}
  outputs = iter([{'status': 'stalled'}] * 3 + [{'status': 'ok'}])
  assert lra.run_in_subprocess(CASE, 1.0) == {'status': 'stalled', 'attempts': 3}


@pytest.mark.parametrize('argv, words', [
    (['--attention', 'performer,nope'], ['--attention', "'nope'", 'full-dense', 'routing']),
    (['--lengths', '1024,4k'], ['--lengths', "'1024,4k'", 'positive ints']),
    (['--lengths', '0'], ['--lengths', "'0'"]),
    (['--batch', '0'], ['--batch', "'0'", 'positive']),
    (['--timeout', '-1'], ['--timeout', "'-1'", 'positive']),
    (['--scale', 'huge'], ['--scale', "'huge'", "'paper', 'cpu', 'tiny'"]),
])
def test_bad_arguments_name_the_argument_value_and_choices(argv, words, capsys):
  with pytest.raises(SystemExit):
    lra.main(argv)
  error = capsys.readouterr().err
  for word in words:
    assert word in error, error
