"""The prepare CLI: idempotent, safe on several hosts, and partial or damaged data is never read."""

import json
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from efficient_attn.data import CorruptDataError, MissingDataError, get_task, listops, prepare
from efficient_attn.data import generated, pathfinder, tfds_files



def files_and_times(folder: pathlib.Path) -> dict:
  return {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()}


def copy_listops(prepared_dir, tmp_path) -> pathlib.Path:
  """A copy of the prepared tiny ListOps under `tmp_path`; returns its version folder."""
  shutil.copytree(prepared_dir / 'lra_listops', tmp_path / 'lra_listops')
  return tmp_path / 'lra_listops' / 'tiny' / '1.0.0'


def test_second_call_does_nothing(prepared_dir, tmp_path, capsys):
  copy_listops(prepared_dir, tmp_path)
  before = files_and_times(tmp_path / 'lra_listops')
  prepare.main(['listops', '--config', 'tiny', '--data_dir', str(tmp_path)])
  assert 'already prepared' in capsys.readouterr().out
  assert files_and_times(tmp_path / 'lra_listops') == before
  assert len(get_task('listops', tmp_path, split='test', config='tiny').source) == 32


def test_interrupted_preparation_is_not_read_and_is_redone(tmp_path, monkeypatch):
  real_generate = listops.generate

  def interrupted(*args, **kwargs):
    real_generate(*args, **kwargs)
    raise KeyboardInterrupt

  monkeypatch.setattr(listops, 'generate', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.main(['listops', '--config', 'tiny', '--data_dir', str(tmp_path)])
  assert tfds_files.find_prepared(tmp_path, 'lra_listops', 'tiny') is None
  assert not (tmp_path / 'lra_listops' / 'tiny' / generated.LOCK_NAME).exists()
  with pytest.raises(MissingDataError, match='prepare listops --config tiny'):
    get_task('listops', tmp_path, config='tiny')
  monkeypatch.setattr(listops, 'generate', real_generate)
  prepare.main(['listops', '--config', 'tiny', '--data_dir', str(tmp_path)])
  assert len(get_task('listops', tmp_path, config='tiny').source) == 256
  assert not list((tmp_path / 'lra_listops' / 'tiny').glob('incomplete*'))


def test_folder_without_completion_files_is_not_complete(prepared_dir, tmp_path):
  version_dir = copy_listops(prepared_dir, tmp_path)
  (version_dir / 'features.json').unlink()
  with pytest.raises(MissingDataError):
    get_task('listops', tmp_path, config='tiny')
  assert generated.prepare('listops', 'tiny', tmp_path) == version_dir
  assert len(get_task('listops', tmp_path, config='tiny').source) == 256


def test_missing_data_message_is_short(tmp_path):
  with pytest.raises(MissingDataError) as error:
    get_task('pathfinder', tmp_path, resolution=64, difficulty='easy')
  message = str(error.value)
  assert len(message.replace(str(tmp_path), 'DIR')) < 200, message
  for part in ('pathfinder (res64_easy) is not prepared', str(tmp_path),
               'python -m efficient_attn.data.prepare pathfinder --config res64_easy'):
    assert part in message


def test_damaged_or_truncated_shard_is_named(prepared_dir, tmp_path):
  version_dir = copy_listops(prepared_dir, tmp_path)
  task = get_task('listops', tmp_path, config='tiny')
  tokens = task.source[7]['inputs'].astype('uint8').tobytes()
  shard = next(version_dir.glob('*-train.array_record-*'))
  data = shard.read_bytes()
  damaged = bytearray(data)
  damaged[data.index(tokens) + 2] ^= 1
  shard.write_bytes(bytes(damaged))
  task = get_task('listops', tmp_path, config='tiny')
  assert len(task.source[6]['inputs'])
  with pytest.raises(CorruptDataError, match=f'{shard.name} is damaged: record 7'):
    [task.source[i] for i in (5, 6, 7)]
  shard.write_bytes(data[:len(data) // 3])
  with pytest.raises(CorruptDataError, match=shard.name):
    get_task('listops', tmp_path, config='tiny')


def lock_of(config_dir: pathlib.Path, host: str, pid: int) -> pathlib.Path:
  lock = config_dir / generated.LOCK_NAME
  config_dir.mkdir(parents=True, exist_ok=True)
  lock.write_text(json.dumps({'host': host, 'pid': pid, 'time': time.time()}))
  return lock


def test_second_host_waits_for_the_first(tmp_path, monkeypatch):
  started, finish, calls = threading.Event(), threading.Event(), []
  real_generate = listops.generate

  def slow_generate(*args, **kwargs):
    calls.append(1)
    started.set()
    finish.wait(30)
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(listops, 'generate', slow_generate)
  results = {}

  def host(name):
    results[name] = generated.prepare('listops', 'tiny', tmp_path, poll_s=0.02)

  first = threading.Thread(target=host, args=('first',))
  first.start()
  assert started.wait(30)
  config_dir = tmp_path / 'lra_listops' / 'tiny'
  in_progress = list(config_dir.glob('incomplete.*'))
  assert in_progress and (config_dir / generated.LOCK_NAME).exists()
  second = threading.Thread(target=host, args=('second',))
  second.start()
  time.sleep(0.3)
  assert second.is_alive() and all(p.exists() for p in in_progress)
  finish.set()
  first.join(30)
  second.join(30)
  assert results['first'] == results['second'] == config_dir / '1.0.0'
  assert len(calls) == 1 and not (config_dir / generated.LOCK_NAME).exists()
  assert len(get_task('listops', tmp_path, config='tiny').source) == 256


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  config_dir = tmp_path / 'lra_listops' / 'tiny'
  lock = lock_of(config_dir, socket.gethostname(), dead.pid)
  (config_dir / 'incomplete.ABC_1.0.0').mkdir()
  found = generated.prepare('listops', 'tiny', tmp_path, timeout_s=5, poll_s=0.02)
  assert found == config_dir / '1.0.0'
  assert not lock.exists() and not list(config_dir.glob('incomplete.*'))


def test_lock_of_another_host_is_waited_for_and_its_folder_kept(tmp_path):
  config_dir = tmp_path / 'lra_listops' / 'tiny'
  lock = lock_of(config_dir, 'another-host', 1)
  in_progress = config_dir / 'incomplete.ABC_1.0.0'
  in_progress.mkdir()
  with pytest.raises(TimeoutError, match=f'{lock}.*another-host.*delete it if no preparation'):
    generated.prepare('listops', 'tiny', tmp_path, timeout_s=0.2, poll_s=0.02)
  assert lock.exists() and in_progress.exists()


def test_workers_reach_the_pathfinder_generator(tmp_path, monkeypatch):
  real_chunks, workers = pathfinder.generate_chunks, []

  def chunks(*args, **kwargs):
    workers.append(kwargs.pop('workers'))
    return real_chunks(*args, **kwargs)

  monkeypatch.setattr(pathfinder, 'generate_chunks', chunks)
  prepare.main(['pathfinder', '--config', 'tiny', '--workers', '3', '--data_dir', str(tmp_path)])
  assert workers == [3, 3, 3]
  with pytest.raises(TypeError, match='workers'):
    generated.prepare('listops', 'tiny', tmp_path, workers=2)


def test_status_covers_every_config_and_split(prepared_dir, tmp_path, capsys):
  copy_listops(prepared_dir, tmp_path)
  prepare.main(['status', '--data_dir', str(tmp_path)])
  lines = capsys.readouterr().out.splitlines()
  assert 'listops tiny: train 256, valid 32, test 32' in lines
  configs = [(t, c) for t in generated.BUILDERS for c in generated.config_names(t)]
  for task, config in configs:
    assert any(line.startswith(f'{task} {config}: ') for line in lines)
  assert (f'pathfinder res64_easy: not prepared; run: python -m efficient_attn.data.prepare '
          f'pathfinder --config res64_easy --data_dir {tmp_path}') in lines
  assert any(line.startswith('stdlib_lm: train ') for line in lines)
  assert any(line.startswith('text: NOT READY') for line in lines)
  assert len(lines) == len(configs) + 4  # text, retrieval, image, stdlib_lm
  with pytest.raises(SystemExit):
    prepare.main(['pathfinder', '--resolution', '48'])
