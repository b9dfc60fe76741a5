"""Reads data sets that TFDS prepared (`tfds build`, `tfds.load`, our builders) without TensorFlow.

A prepared data set lives in `<data_dir>/<name>[/<config>]/<version>/`. TFDS
itself reads its metadata (`tfds.builder_from_directory`) and decodes examples
(`features.deserialize_example_np`). array_record folders are read by TFDS's own
data source (`as_data_source`). TFRecord folders (what `tfds build` writes by
default) are read by TFDS only through TensorFlow, so their framing (record
length, masked CRC-32C of the length, data, masked CRC-32C of the data) is read
here: no installed library reads it without TensorFlow. Both CRCs are checked.
No installed package offers CRC-32C to Python, and a pure-Python loop takes about
17 s for an IMDB-sized file (25K reviews, 34 MB), so the CRCs of all records of a
file are computed at once in numpy (about 1.5 s on the same 2-core machine).

Every damage raises CorruptDataError naming the file: a missing or truncated
shard, a record count that differs from dataset_info.json, a bad CRC, and a
record of an array_record file that cannot be read or decoded (with its index).
"""

import pathlib
import re
import struct
from typing import Sequence

import numpy as np

from efficient_attn.data import common

_CRC_MASK_DELTA = 0xA282EAD8
_VERSION = re.compile(r'^\d+\.\d+\.\d+$')


def _crc32c_table() -> np.ndarray:
  """Lookup table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
  return table.astype(np.uint32)


_CRC32C_TABLE = _crc32c_table()


def crc32c_many(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """CRC-32C of the pieces `data[starts[i]:starts[i] + lengths[i]]`, all pieces at once.

  Args:
    data: uint8 array.
    starts: int64 `[n]` offsets of the pieces.
    lengths: int64 `[n]` lengths of the pieces.

  Returns:
    uint32 `[n]` checksums.
  """
  # Byte j of every piece longer than j in one vectorised table step; longest first,
  # so the pieces still running are a prefix.
  order = np.argsort(-lengths, kind='stable')
  starts, lengths = starts[order], lengths[order]
  crc = np.full(len(starts), 0xFFFFFFFF, dtype=np.uint32)
  running = np.searchsorted(-lengths, -np.arange(lengths.max(initial=0)), side='left')
  for j, n in enumerate(running):
    head = crc[:n]
    crc[:n] = _CRC32C_TABLE[(head ^ data[starts[:n] + j]) & 0xFF] ^ (head >> 8)
  result = np.empty_like(crc)
  result[order] = crc ^ np.uint32(0xFFFFFFFF)
  return result


def mask_crc(crc: np.ndarray) -> np.ndarray:
  """The masked form of CRCs that TFRecord files store."""
  crc = np.asarray(crc, dtype=np.uint64)
  return ((((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)


def _uint32_at(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """The little-endian uint32 stored at each of `offsets` in uint8 `data`."""
  return data[offsets[:, None] + np.arange(4)].copy().view('<u4')[:, 0]


def read_tfrecord(path: pathlib.Path) -> list[bytes]:
  """All records of a TFRecord file; CorruptDataError naming the file when damaged."""
  raw = pathlib.Path(path).read_bytes()
  starts, lengths, offset = [], [], 0
  while offset < len(raw):
    if offset + 12 > len(raw):
      raise common.CorruptDataError(f'{path} is truncated: a record header is cut at byte {offset}')
    (length,) = struct.unpack_from('<Q', raw, offset)
    end = offset + 12 + length + 4
    if end > len(raw):
      raise common.CorruptDataError(
          f'{path} is truncated or damaged: record {len(starts)} at byte {offset} needs '
          f'{end - len(raw)} more bytes')
    starts.append(offset)
    lengths.append(length)
    offset = end
  data = np.frombuffer(raw, dtype=np.uint8)
  starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
  header_crcs = mask_crc(crc32c_many(data, starts, np.full_like(starts, 8)))
  data_crcs = mask_crc(crc32c_many(data, starts + 12, lengths))
  headers = header_crcs != _uint32_at(data, starts + 8)
  bodies = data_crcs != _uint32_at(data, starts + 12 + lengths)
  for bad, what in ((headers, 'header'), (bodies, 'data')):
    if bad.any():
      index = int(np.argmax(bad))
      raise common.CorruptDataError(
          f'{path} is damaged: record {index} (at byte {starts[index]}) fails its {what} CRC')
  return [raw[s + 12:s + 12 + n] for s, n in zip(starts.tolist(), lengths.tolist())]


def find_prepared(data_dir, name: str, config: str | None = None) -> pathlib.Path | None:
  """The newest complete version folder of TFDS data set `name` (in `config`), or None.

  Args:
    data_dir: data folder, or None for the default folders (the first holding it wins).
    name: TFDS name, e.g. 'imdb_reviews'.
    config: config name, e.g. 'plain_text', or None for data sets without configs.

  Returns:
    `<data_dir>/<name>[/<config>]/<version>`. TFDS writes into `incomplete.*` and
    renames at the end, so only folders named as versions and holding
    dataset_info.json and features.json count.
  """
  relative = f'{name}/{config}' if config else name
  for root in common.data_dirs(data_dir):
    versions = [p for p in (root / relative).glob('*') if _VERSION.match(p.name)
                and (p / 'dataset_info.json').exists() and (p / 'features.json').exists()]
    if versions:
      return max(versions, key=lambda p: tuple(int(x) for x in p.name.split('.')))
  return None


def require_prepared(data_dir, name: str, config: str | None = None, *,
                     download: str) -> pathlib.Path:
  """`find_prepared`'s folder; MissingDataError saying where to put it and `download` if absent."""
  version_dir = find_prepared(data_dir, name, config)
  if version_dir is None:
    relative = f'{name}/{config}' if config else name
    raise common.missing_data_error(
        data_dir, [f'{relative}/<version>/dataset_info.json'], what=f'TFDS-prepared {name}',
        expected=f'a TFDS-prepared folder {relative}/<version>/', download=download)
  return version_dir


def read_split(version_dir: pathlib.Path, split: str, fix: str) -> Sequence[dict]:
  """Random-access source (`len`, `[i]`, `__getitems__`) of the decoded examples of a split.

  Args:
    version_dir: a folder from `find_prepared`.
    split: a split stored there.
    fix: what the user should do about damaged data, appended to error messages.

  Returns:
    The examples as TFDS decodes them (dicts of numpy arrays and scalars).

  Raises:
    CorruptDataError: naming a missing, short or damaged file (reading a damaged
      array_record record raises it too, naming the record).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder_from_directory(str(version_dir))
  except Exception as error:  # TFDS raises several types for unreadable metadata
    raise common.CorruptDataError(
        f'cannot read the metadata in {version_dir}: {error}; {fix}') from error
  common.check_choice(f'split of {version_dir}', split, tuple(builder.info.splits.keys()))
  split_info = builder.info.splits[split]
  paths = [pathlib.Path(p) for p in split_info.filepaths]
  lengths = list(split_info.shard_lengths)
  missing = [p for p in paths if not p.exists()]
  if missing:
    raise common.CorruptDataError(f'{missing[0]} is missing; {fix}')
  file_format = builder.info.file_format.value
  if file_format == 'array_record':
    _check_counts(paths, lengths, [_count_array_records(p, fix) for p in paths], fix)
    source = builder.as_data_source(split=split)
  elif file_format == 'tfrecord':
    try:
      shards = [read_tfrecord(path) for path in paths]
    except common.CorruptDataError as error:
      raise common.CorruptDataError(f'{error}; {fix}') from error
    _check_counts(paths, lengths, [len(shard) for shard in shards], fix)
    source = common.MappedSource([r for shard in shards for r in shard],
                                 builder.info.features.deserialize_example_np)
  else:
    raise ValueError(f'{version_dir} holds {file_format} files; only array_record and tfrecord '
                     'are read')
  return NamedErrorSource(source, paths, lengths, fix)


def _count_array_records(path: pathlib.Path, fix: str) -> int:
  """Number of records of an array_record file; CorruptDataError naming it when unreadable."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    count = reader.num_records()
    reader.close()
  except Exception as error:  # the reader raises RuntimeError or ValueError
    raise common.CorruptDataError(f'cannot read {path}: {error}; {fix}') from error
  return count


def _check_counts(paths, expected: list[int], counts: list[int], fix: str) -> None:
  """Raises CorruptDataError naming the first shard whose record count is not as expected."""
  for path, want, count in zip(paths, expected, counts):
    if count != want:
      raise common.CorruptDataError(
          f'{path} holds {count} records, dataset_info.json says {want}; {fix}')


class NamedErrorSource:
  """A random-access source whose read errors become CorruptDataError naming file and record."""

  def __init__(self, base, paths: list[pathlib.Path], lengths: list[int], fix: str):
    self.base = base
    self.paths = paths
    self.ends = np.cumsum(lengths)
    self.length = int(sum(lengths))
    self.fix = fix

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.length:
      raise IndexError(f'index {index} is out of range for {self.length} examples')
    try:
      return self.base[index]
    except Exception as error:  # readers and decoders raise many types for damaged data
      shard = int(np.searchsorted(self.ends, index, side='right'))
      first = int(self.ends[shard - 1]) if shard else 0
      raise common.CorruptDataError(
          f'{self.paths[shard]} is damaged: record {index - first} cannot be read ({error}); '
          f'{self.fix}') from error

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    try:
      return list(self.base.__getitems__(indices))
    except Exception:  # pylint: disable=broad-except
      # Read one by one to name the damaged record.
      return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f'NamedErrorSource({self.base!r})'
