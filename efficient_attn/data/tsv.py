"""Random access to the lines of a tab-separated file (the LRA ListOps and Retrieval files).

The file is read once to index its lines: every non-empty line must have the
expected number of fields and a valid label, else CorruptDataError names the file
and line. Lines are then read again by byte offset when an example is asked for,
so a 1 GB file costs only its offsets and labels in memory.
"""

import os
import pathlib
from typing import Callable

import numpy as np

from efficient_attn.data import common


class TsvLines:
  """Random-access source of the fields of a TSV file's lines, with their labels.

  Item `i` is `{'fields': list of bytes, 'label': int32}` of the i-th data line.

  Args:
    path: the file.
    num_fields: fields every data line must have.
    label_field: index of the field holding the label.
    parse_label: bytes -> int, raising ValueError for a bad label.
    header: first field of a header line to skip, or None when there is none.
  """

  def __init__(self, path: pathlib.Path, num_fields: int, label_field: int,
               parse_label: Callable[[bytes], int], header: bytes | None = None):
    self.path = pathlib.Path(path)
    self.num_fields = num_fields
    self.offsets, self.labels = self._index(label_field, parse_label, header)
    self._fd = None

  def _index(self, label_field, parse_label, header) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and labels of the data lines, checking every line."""
    offsets, labels = [], []
    offset = 0
    with open(self.path, 'rb') as f:
      for number, line in enumerate(f, 1):
        fields = line.rstrip(b'\r\n').split(b'\t')
        if number == 1 and header is not None and fields[0] == header:
          offset += len(line)
          continue
        if line.strip():
          if len(fields) != self.num_fields:
            raise common.CorruptDataError(
                f'{self.path}, line {number}: expected {self.num_fields} tab-separated fields, '
                f'found {len(fields)}; the file is truncated or damaged')
          try:
            labels.append(parse_label(fields[label_field]))
          except ValueError as error:
            raise common.CorruptDataError(f'{self.path}, line {number}: {error}') from None
          offsets.append(offset)
        offset += len(line)
    if not offsets:
      raise common.CorruptDataError(f'{self.path} holds no examples')
    return np.asarray(offsets, dtype=np.int64), np.asarray(labels, dtype=np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getstate__(self) -> dict:
    return {**self.__dict__, '_fd': None}

  def __del__(self):
    if getattr(self, '_fd', None) is not None:
      os.close(self._fd)

  def _line(self, index: int) -> bytes:
    """The raw line `index`, without its newline."""
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
    if len(fields) != self.num_fields:
      raise common.CorruptDataError(f'{self.path} changed since it was indexed (line {index})')
    return {'fields': fields, 'label': self.labels[index]}

  def __repr__(self) -> str:
    return f'TsvLines({self.path}, {len(self)} lines)'


def parse_class(num_classes: int) -> Callable[[bytes], int]:
  """A label parser accepting integers 0 .. num_classes - 1 (also written as '1.0')."""

  def parse(field: bytes) -> int:
    try:
      value = float(field)
    except ValueError:
      value = None
    if value is None or not value.is_integer() or not 0 <= value < num_classes:
      raise ValueError(f'label {field!r} is not an integer in 0-{num_classes - 1}')
    return int(value)

  return parse
