"""Byte-level language modelling on the standard library: split, windows, bits per byte."""

import math

import numpy as np
import pytest

from efficient_attn.data import get_task, make_batches
from efficient_attn.metrics import bits_per_byte, bits_per_byte_from_logits
from efficient_attn.data import common, stdlib_lm


def write_library(root):
  files = {'os.py': b'import sys\n', 'json/__init__.py': b'"""JSON."""\n',
           'json/decoder.py': b'x = 1\n', 'test/test_os.py': b'skip\n',
           'unittest/tests/case.py': b'skip\n', 'test_cases.py': b'skip\n',
           'site-packages/pkg.py': b'skip\n', 'email/mime/text.py': b'y = 2\n'}
  for name, data in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_tests_and_packages_are_excluded(tmp_path):
  write_library(tmp_path)
  assert stdlib_lm.source_files(tmp_path) == [
      'email/mime/text.py', 'json/__init__.py', 'json/decoder.py', 'os.py']


def test_split_by_file_is_deterministic_and_partitions(tmp_path):
  write_library(tmp_path)
  splits = {s: stdlib_lm.split_files(s, tmp_path) for s in common.SPLITS}
  assert sorted(sum(splits.values(), [])) == stdlib_lm.source_files(tmp_path)
  assert splits == {s: stdlib_lm.split_files(s, tmp_path) for s in common.SPLITS}
  assert stdlib_lm.split_of('json/decoder.py') == stdlib_lm.split_of('json/decoder.py')


def test_real_library_is_megabytes_with_every_split_used():
  sizes = {s: len(stdlib_lm.split_bytes(s)) for s in common.SPLITS}
  assert sizes['train'] > 5e6 and sizes['valid'] > 1e5 and sizes['test'] > 1e5


def test_windows_predict_the_next_byte():
  data = np.frombuffer(b'abcdefghij', dtype=np.uint8)
  source = stdlib_lm.WindowSource(data, 4)
  assert len(source) == 3  # 9 predicted bytes in windows of 4, 4, 1
  assert source[0]['inputs'].tolist() == [ord(c) + 1 for c in 'abcd']
  assert source[0]['targets'].tolist() == [ord(c) + 1 for c in 'bcde']
  assert source[2]['inputs'].tolist() == [ord('i') + 1]
  assert source[2]['targets'].tolist() == [ord('j') + 1]


def test_task_batches_are_sequences(tmp_path):
  task = get_task('stdlib_lm', split='valid', seq_len=64)
  assert task.causal_lm and task.metric == 'bits_per_byte' and task.vocab_size == 257
  batches = list(make_batches(task, 16, shard_index=0, shard_count=1))
  batch = batches[0]
  assert batch['inputs'].shape == batch['targets'].shape == batch['mask'].shape == (16, 64)
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  predicted = sum(int(b['mask'].sum()) for b in batches)
  assert predicted == len(stdlib_lm.split_bytes('valid')) - 1


def test_bits_per_byte():
  assert bits_per_byte(10 * math.log(2), 10) == pytest.approx(1.0)
  logits = np.zeros((2, 3, 256))
  targets = np.array([[1, 2, 3], [4, 5, 0]])
  mask = np.array([[True, True, True], [True, True, False]])
  assert bits_per_byte_from_logits(logits, targets, mask) == pytest.approx(8.0)
  logits[0, 0, 1] = 100.0
  assert bits_per_byte_from_logits(logits, targets, mask) == pytest.approx(8.0 * 4 / 5, abs=1e-6)
