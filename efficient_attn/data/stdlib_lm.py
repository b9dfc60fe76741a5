"""Byte-level language modelling on the Python standard library's own source files.

Every machine with Python has this real text: the .py files of the running
interpreter's Lib folder, without test suites and installed packages (about
12 MB in 730 files for Python 3.11). Files are split into train/valid/test
(90/5/5) by a hash of their path inside Lib, so the split is deterministic and a
file never changes sides; the exact text depends on the Python version, which
`describe()` reports. Each split's files are joined in path order and cut into
windows of `seq_len` bytes: inputs are bytes t..t+L-1 and targets bytes t+1..t+L
(ids b + 1, 0 is padding; the last window may be shorter). The metric is bits
per byte: the mean cross-entropy in bits of predicting each target byte.
"""

import hashlib
import math
import os
import pathlib
import platform
import sysconfig

import numpy as np

from efficient_attn.data import common

SPLIT_PERCENT = {'train': (0, 90), 'valid': (90, 95), 'test': (95, 100)}
DEFAULT_SEQ_LEN = 1024
EXCLUDED_FOLDERS = frozenset({'test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
                              '__pycache__'})


def stdlib_root() -> pathlib.Path:
  """The running interpreter's standard library folder."""
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def source_files(root: pathlib.Path | None = None) -> list[str]:
  """Paths (relative, '/'-separated, sorted) of the library's .py files, tests excluded."""
  root = pathlib.Path(root) if root is not None else stdlib_root()
  if not root.is_dir():
    raise common.MissingDataError(f'the standard library folder {root} does not exist')
  files = []
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = [name for name in subfolders if name not in EXCLUDED_FOLDERS]
    relative = pathlib.Path(folder).relative_to(root)
    files += [(relative / name).as_posix() for name in names
              if name.endswith('.py') and not name.startswith('test_')]
  return sorted(files)


def split_of(relative_path: str) -> str:
  """The split a file belongs to, from a hash of its relative path."""
  bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], 'big') % 100
  for split, (low, high) in SPLIT_PERCENT.items():
    if low <= bucket < high:
      return split
  raise AssertionError(bucket)


def split_files(split: str, root: pathlib.Path | None = None) -> list[str]:
  """The relative paths of one split's files, sorted."""
  common.check_choice('split', split, common.SPLITS)
  return [path for path in source_files(root) if split_of(path) == split]


def split_bytes(split: str, root: pathlib.Path | None = None) -> np.ndarray:
  """A split's files joined in path order, as uint8."""
  root = pathlib.Path(root) if root is not None else stdlib_root()
  parts = [(root / path).read_bytes() for path in split_files(split, root)]
  return np.frombuffer(b''.join(parts), dtype=np.uint8)


def describe(root: pathlib.Path | None = None) -> str:
  """Python version, folder and per-split file counts and sizes of the corpus."""
  root = pathlib.Path(root) if root is not None else stdlib_root()
  files = source_files(root)
  lines = [f'Python {platform.python_version()} standard library at {root}']
  for split in common.SPLITS:
    chosen = [path for path in files if split_of(path) == split]
    size = sum((root / path).stat().st_size for path in chosen)
    lines.append(f'{split}: {len(chosen)} files, {size / 1e6:.2f} MB')
  return '\n'.join(lines)


class WindowSource:
  """Random-access source of next-byte windows over one long byte array."""

  def __init__(self, data: np.ndarray, seq_len: int):
    if len(data) < 2:
      raise ValueError('need at least 2 bytes of text')
    self.data = data
    self.seq_len = seq_len

  def __len__(self) -> int:
    return math.ceil((len(self.data) - 1) / self.seq_len)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(index)
    start = index * self.seq_len
    stop = min(start + self.seq_len, len(self.data) - 1)
    return {'inputs': self.data[start:stop].astype(np.int32) + 1,
            'targets': self.data[start + 1:stop + 1].astype(np.int32) + 1}

  def __repr__(self) -> str:
    return f'WindowSource({len(self.data)} bytes, seq_len={self.seq_len})'


def load(split: str, data_dir=None, seq_len: int | None = None,
         root: str | pathlib.Path | None = None) -> common.Task:
  """The byte-level language-modelling task.

  Args:
    split: 'train', 'valid' or 'test'.
    data_dir: unused (the text is the interpreter's own library); accepted for a uniform call.
    seq_len: window length; 1024 when None.
    root: library folder to read instead of the running interpreter's.

  Returns:
    The Task (causal_lm=True, metric 'bits_per_byte'); examples are
    {'inputs', 'targets': int32 [<= seq_len]}.
  """
  del data_dir
  common.check_choice('split', split, common.SPLITS)
  seq_len = seq_len or DEFAULT_SEQ_LEN
  return common.Task(name='stdlib_lm', split=split,
                     source=WindowSource(split_bytes(split, root), seq_len),
                     vocab_size=common.BYTE_VOCAB_SIZE, num_classes=common.BYTE_VOCAB_SIZE,
                     seq_len=seq_len, metric='bits_per_byte', causal_lm=True)
