"""Tests of the benchmark harness's pure parts: timing logic, case plan, tables."""

import json

import pytest

from efficient_attn import bench


class FakeClock:
  """A clock that advances only when a fake step runs, by the step's given duration."""

  def __init__(self, durations):
    self.now = 0.0
    self.durations = list(durations)
    self.calls = 0

  def __call__(self):
    return self.now

  def step(self):
    self.now += self.durations[self.calls]
    self.calls += 1


def test_min_time_excludes_warm_up():
  clock = FakeClock([0.5, 3.0, 2.0, 4.0])
  assert bench.min_time(clock.step, repeats=3, clock=clock) == 2.0
  assert clock.calls == 4


def test_min_time_stops_after_a_long_call():
  clock = FakeClock([100.0, 30.0, 1.0, 1.0])
  assert bench.min_time(clock.step, repeats=3, clock=clock) == 30.0
  assert clock.calls == 2


def test_min_time_times_at_least_one_call():
  clock = FakeClock([1.0, 5.0])
  assert bench.min_time(clock.step, repeats=0, clock=clock) == 5.0


def test_plan_without_peers_has_only_our_rows():
  cases = bench.plan_cases(('full', 'linformer'), [False, True], [64], ['fwd'], peers=False)
  assert cases == [('full', False, 64, 'fwd'), ('linformer', False, 64, 'fwd'),
                   ('full', True, 64, 'fwd')]


def test_plan_puts_each_peer_right_after_its_counterpart():
  names = ('full', 'performer', bench.MHA_LINFORMER)
  cases = bench.plan_cases(names, [False], [64, 128], ['fwd', 'fwd_bwd'], peers=True)
  for peer, spec in bench.PEERS.items():
    if spec['ours'] not in names:
      assert not any(case[0] == peer for case in cases)
      continue
    for causal in spec['causal']:
      for length in (64, 128):
        for mode in ('fwd', 'fwd_bwd'):
          i = cases.index((peer, causal, length, mode))
          assert cases[i - 1] == (spec['ours'], causal, length, mode)
  # full causal is not asked for, but the causal SDPA peer brings it in.
  assert ('full', True, 64, 'fwd') in cases
  assert len(cases) == len(set(cases))


def test_missing_peer_packages_names_each_package_once():
  missing = bench.missing_peer_packages(find_spec=lambda module: None)
  assert missing == list(dict.fromkeys(p['package'] for p in bench.PEERS.values()))
  assert bench.missing_peer_packages(find_spec=lambda module: object()) == []


def _row(name, length, mode, seconds, causal=False):
  return {'attention': name, 'length': length, 'mode': mode, 'causal': causal,
          'seconds': seconds, 'peak_bytes': 2e6, 'xla_bytes': 3e6}


INFO = {'cpu': 'test cpu', 'cores': 2, 'memory_gib': 1.0, 'backend': 'cpu',
        'versions': {'jax': '0', 'torch': '1'}, 'batch': 1, 'heads': 8, 'head_dim': 64,
        'repeats': 2, 'load_start': (0.5, 0.25, 0.125), 'load_end': (1.0, 0.5, 0.25)}


def test_table_puts_peer_beside_ours_with_peer_over_ours(tmp_path):
  rows = [_row('performer', 1024, 'fwd', 1.0), _row('performer', 1024, 'fwd_bwd', 2.0),
          _row('pt:performer-pytorch', 1024, 'fwd', 3.0),
          _row('pt:performer-pytorch', 1024, 'fwd_bwd', 1.0),
          {'attention': 'full', 'length': 1024, 'mode': 'fwd_bwd', 'causal': False,
           'error': 'out of memory: needs 30 GiB'}]
  stem = str(tmp_path / 'peers')
  bench.write_results(rows, INFO, 'python -m efficient_attn.bench --peers', stem)
  text = open(stem + '.md').read()
  assert ('| performer | pt:performer-pytorch | no | 1024 | 1.000 | 3.000 | 3.00 | 2.000 | '
          '1.000 | 0.50 | 2 | 2 |') in text
  assert '| full | backend=blocked | no | 1024 | - | OOM | - | - | - |' in text
  assert '| performer | num_features=256 | no | 1024 | 1.000 | 2.000 | - | 2 | 3 |' in text
  for fact in ('`python -m efficient_attn.bench --peers`', 'test cpu, 2 cores',
               'at start 0.50, 0.25, 0.12, at end 1.00, 0.50, 0.25', 'torch 1',
               bench.PEERS['pt:performer-pytorch']['note']):
    assert fact in text
  assert json.load(open(stem + '.json'))['rows'] == rows


def test_table_without_peers_has_no_peer_section(tmp_path):
  stem = str(tmp_path / 'speed')
  bench.write_results([_row('full', 64, 'fwd_bwd', 2.0), _row('lsh', 64, 'fwd_bwd', 0.5),
                       _row('routing', 64, 'fwd_bwd', 1.0)], INFO, 'cmd', stem)
  text = open(stem + '.md').read()
  assert 'peer' not in text.lower()
  assert ('| lsh | chunk_len=64, n_hashes=2, n_chunks_after=0, n_buckets=2 | no | 64 | - | '
          '0.500 | 4.00 |') in text
  assert '| routing | num_clusters=8 | no | 64 |' in text  # set from the length


def test_peers_flag_names_requirements_file_when_a_package_is_missing(monkeypatch, capsys):
  monkeypatch.setattr(bench, 'missing_peer_packages', lambda: ['torch'])
  with pytest.raises(SystemExit):
    bench.main(['--peers', '--attention', 'full'])
  assert 'requirements-peers.txt' in capsys.readouterr().err
