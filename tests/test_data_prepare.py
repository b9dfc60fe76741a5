"""The prepare CLI: idempotent, and interrupted or partial data is never read as complete."""

import pathlib

import pytest

from efficient_attn.data import CorruptDataError, MissingDataError, get_task, listops, prepare
from efficient_attn.data import generated


def files_and_times(folder: pathlib.Path) -> dict:
  return {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()}


def test_second_call_does_nothing(tmp_path, capsys):
  prepare.main(['listops', '--config', 'tiny', '--data_dir', str(tmp_path)])
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
  assert generated.find_prepared('listops', 'tiny', tmp_path) is None
  with pytest.raises(MissingDataError, match='prepare listops --config tiny'):
    get_task('listops', tmp_path, config='tiny')
  monkeypatch.setattr(listops, 'generate', real_generate)
  prepare.main(['listops', '--config', 'tiny', '--data_dir', str(tmp_path)])
  assert len(get_task('listops', tmp_path, config='tiny').source) == 256
  assert not list((tmp_path / 'lra_listops' / 'tiny').glob('incomplete*'))


def test_folder_without_completion_files_is_not_complete(tmp_path):
  version_dir = tmp_path / 'lra_listops' / 'tiny' / '1.0.0'
  version_dir.mkdir(parents=True)
  (version_dir / 'lra_listops-train.array_record-00000-of-00001').write_bytes(b'half')
  with pytest.raises(MissingDataError):
    get_task('listops', tmp_path, config='tiny')
  generated.prepare('listops', 'tiny', tmp_path)
  assert len(get_task('listops', tmp_path, config='tiny').source) == 256


def test_damaged_shard_is_named(tmp_path):
  generated.prepare('listops', 'tiny', tmp_path)
  shard = next((tmp_path / 'lra_listops' / 'tiny' / '1.0.0').glob('*-train.array_record-*'))
  shard.write_bytes(shard.read_bytes()[:40000])
  with pytest.raises(CorruptDataError, match=shard.name):
    get_task('listops', tmp_path, config='tiny')


def test_status_and_unknown_config(tmp_path, capsys):
  prepare.main(['status', '--data_dir', str(tmp_path)])
  out = capsys.readouterr().out
  assert 'stdlib_lm: ready' in out and 'listops: NOT READY' in out
  with pytest.raises(SystemExit):
    prepare.main(['pathfinder', '--resolution', '48'])
