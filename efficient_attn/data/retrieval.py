"""LRA Retrieval: does one ACL Anthology Network paper cite the other? Read from the LRA files.

Each example is a pair of documents at byte level (ids b + 1, 0 is padding), each
cut to `seq_len` bytes (4K in the paper, default 4096); label 1 when they are
linked by a citation. A dual-encoder task: examples hold 'inputs1' and 'inputs2'.

Data (no download happens here): the LRA release archive lra_release.gz
(https://storage.googleapis.com/long-range-arena/lra_release.gz, from
https://github.com/google-research/long-range-arena), extracted so that
`<data_dir>/lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv` exist. Each
line is `label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`, no header, no quoting.
"""

import os
import pathlib

import numpy as np

from efficient_attn.data import common

SPLITS = ('train', 'valid', 'test')
NUM_CLASSES = 2
DEFAULT_SEQ_LEN = 4096
_FILE_SPLIT = {'train': 'train', 'valid': 'eval', 'test': 'test'}
_FIELDS = 5


def find_tsv(data_dir, split: str) -> pathlib.Path:
  """The TSV file of a split."""
  name = f'new_aan_pairs.{_FILE_SPLIT[split]}.tsv'
  return common.find_data(
      data_dir, [f'lra_release/tsv_data/{name}', f'lra_release/lra_release/tsv_data/{name}',
                 f'tsv_data/{name}'],
      what=f'LRA Retrieval ({split})',
      expected=f'lra_release/tsv_data/{name} (and the other new_aan_pairs.*.tsv files)',
      download=common.LRA_RELEASE_NOTE,
      hint='Extract the archive there so that lra_release/ is directly inside the data folder.')


def index_tsv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Byte offsets of the lines of a pair file and their labels, checking every line.

  Raises:
    CorruptDataError: naming the file and line when a line is not a labelled pair.
  """
  offsets, labels = [], []
  offset = 0
  with open(path, 'rb') as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        fields = line.count(b'\t') + 1
        if fields != _FIELDS:
          raise common.CorruptDataError(
              f'{path}, line {number}: expected {_FIELDS} tab-separated fields '
              f'(label, id1, id2, text1, text2), found {fields}; the file is truncated or damaged')
        labels.append(_parse_label(line[:line.index(b'\t')], path, number))
        offsets.append(offset)
      offset += len(line)
  if not offsets:
    raise common.CorruptDataError(f'{path} holds no document pairs')
  return np.asarray(offsets, dtype=np.int64), np.asarray(labels, dtype=np.int32)


def _parse_label(field: bytes, path: pathlib.Path, number: int) -> int:
  """The 0/1 label of a line ('0', '1', '0.0' or '1.0')."""
  try:
    value = float(field)
  except ValueError:
    value = None
  if value not in (0.0, 1.0):
    raise common.CorruptDataError(f'{path}, line {number}: label {field!r} is not 0 or 1')
  return int(value)


class PairSource:
  """Random-access source of document pairs, read from the TSV file on demand."""

  def __init__(self, path: pathlib.Path, offsets: np.ndarray, labels: np.ndarray, max_len: int):
    self.path = path
    self.offsets = offsets
    self.labels = labels
    self.max_len = max_len
    self._fd = None

  def __len__(self) -> int:
    return len(self.labels)

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_fd': None}

  def __del__(self):
    if self._fd is not None:
      os.close(self._fd)

  def _line(self, index: int) -> bytes:
    """The raw line of pair `index`."""
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    start = self.offsets[index]
    chunk, parts = 1 << 16, []
    while True:
      data = os.pread(self._fd, chunk, start)
      end = data.find(b'\n')
      if end >= 0 or len(data) < chunk:
        parts.append(data if end < 0 else data[:end])
        return b''.join(parts)
      parts.append(data)
      start += chunk

  def __getitem__(self, index: int) -> dict:
    fields = self._line(index).rstrip(b'\r').split(b'\t')
    if len(fields) != _FIELDS:
      raise common.CorruptDataError(f'{self.path} changed since it was indexed (pair {index})')
    return {'inputs1': common.encode_bytes(fields[3], self.max_len),
            'inputs2': common.encode_bytes(fields[4], self.max_len),
            'targets': self.labels[index]}

  def __repr__(self) -> str:
    return f'PairSource({self.path}, {len(self)} pairs)'


def load(split: str, data_dir=None, seq_len: int | None = None) -> common.Task:
  """The LRA Retrieval task.

  Args:
    split: 'train', 'valid' (the LRA 'eval' file) or 'test'.
    data_dir: folder holding lra_release/; defaults searched when None.
    seq_len: bytes kept per document; 4096 when None.

  Returns:
    The Task (pair=True); examples are {'inputs1', 'inputs2': int32 [<= seq_len]
    byte ids, 'targets': int32}.
  """
  common.check_choice('split', split, SPLITS)
  seq_len = seq_len or DEFAULT_SEQ_LEN
  path = find_tsv(data_dir, split)
  offsets, labels = index_tsv(path)
  return common.Task(name='retrieval', split=split,
                     source=PairSource(path, offsets, labels, seq_len),
                     vocab_size=common.BYTE_VOCAB_SIZE, num_classes=NUM_CLASSES,
                     seq_len=seq_len, pair=True)
