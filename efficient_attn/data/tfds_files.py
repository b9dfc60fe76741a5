"""Reads data sets that TFDS prepared (`tfds build`, `tfds.load`) without TensorFlow.

A prepared data set lives in `<data_dir>/<name>[/<config>]/<version>/`, with a
dataset_info.json listing each split's shard lengths and files named
`<name>-<split>.<tfrecord|array_record>-<shard>-of-<count>`. Records are serialized
tf.train.Example messages. TFRecord framing is checked (record lengths and their
CRC), and the record counts are compared with dataset_info.json, so a truncated
or damaged shard raises CorruptDataError naming the file.
"""

import json
import pathlib
import struct

from efficient_attn.data import common

_CRC_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
  """Lookup table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (pure Python; meant for short inputs such as length headers)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The masked CRC-32C that TFRecord files store."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def read_tfrecord(path: pathlib.Path) -> list[bytes]:
  """All records of a TFRecord file; CorruptDataError naming the file when damaged."""
  data = pathlib.Path(path).read_bytes()
  records, offset = [], 0
  while offset < len(data):
    if offset + 12 > len(data):
      raise common.CorruptDataError(f'{path} is truncated: a record header is cut at byte {offset}')
    header = data[offset:offset + 8]
    (length,) = struct.unpack('<Q', header)
    (length_crc,) = struct.unpack('<I', data[offset + 8:offset + 12])
    if masked_crc32c(header) != length_crc:
      raise common.CorruptDataError(f'{path} is damaged: bad record header at byte {offset}')
    end = offset + 12 + length + 4
    if end > len(data):
      raise common.CorruptDataError(
          f'{path} is truncated: record at byte {offset} needs {end - len(data)} more bytes')
    records.append(data[offset + 12:offset + 12 + length])
    offset = end
  return records


def _use_array_record(path: pathlib.Path, read):
  """`read(reader)` on an open array_record reader; CorruptDataError naming the file."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
    result = read(reader)
    reader.close()
  except Exception as error:  # the reader raises RuntimeError or ValueError
    raise common.CorruptDataError(f'cannot read {path}: {error}') from error
  return result


def read_array_record(path: pathlib.Path) -> list[bytes]:
  """All records of an array_record file; CorruptDataError naming the file when unreadable."""
  return _use_array_record(path, lambda reader: reader.read_all())


def count_array_records(path: pathlib.Path) -> int:
  """Number of records of an array_record file; CorruptDataError naming the file when unreadable."""
  return _use_array_record(path, lambda reader: reader.num_records())


def parse_example(serialized: bytes, path: pathlib.Path) -> dict:
  """Features of a tf.train.Example as {name: list of bytes, ints or floats}."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  try:
    example = tf_example_pb2.Example.FromString(serialized)
  except Exception as error:  # protobuf's DecodeError
    raise common.CorruptDataError(
        f'{path} holds a record that is not an Example: {error}') from error
  features = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof('kind')
    features[name] = list(getattr(feature, kind).value) if kind else []
  return features


def find_prepared(data_dir, name: str, config: str | None, *, what: str, download: str,
                  hint: str = '') -> pathlib.Path:
  """The newest prepared version folder of TFDS data set `name` (in `config`).

  Raises:
    MissingDataError: naming the folder expected and how to get it.
  """
  relative = f'{name}/{config}' if config else name
  for root in common.data_dirs(data_dir):
    folder = root / relative
    versions = [p.parent for p in folder.glob('*/dataset_info.json')]
    if versions:
      return max(versions, key=lambda p: tuple(int(x) for x in p.name.split('.') if x.isdigit()))
  raise common.missing_data_error(
      data_dir, [f'{relative}/<version>/dataset_info.json'], what=what,
      expected=f'a TFDS-prepared folder {relative}/<version>/ with dataset_info.json',
      download=download, hint=hint)


def read_split(version_dir: pathlib.Path, split: str) -> list[tuple[bytes, pathlib.Path]]:
  """Serialized records of a split with the file of each; counts checked with dataset_info.json."""
  info = json.loads((version_dir / 'dataset_info.json').read_text())
  splits = {s['name']: s for s in info.get('splits', [])}
  common.check_choice('split of ' + str(version_dir), split, tuple(splits))
  lengths = [int(n) for n in splits[split].get('shardLengths', [])]
  name = info.get('name', version_dir.parent.name)
  shards = sorted(version_dir.glob(f'{name}-{split}.*-of-*'))
  if len(shards) != len(lengths):
    raise common.CorruptDataError(
        f'{version_dir} holds {len(shards)} files of split {split}, dataset_info.json lists '
        f'{len(lengths)}')
  records = []
  for path, expected in zip(shards, lengths):
    reader = read_array_record if '.array_record-' in path.name else read_tfrecord
    shard = reader(path)
    if len(shard) != expected:
      raise common.CorruptDataError(
          f'{path} holds {len(shard)} records, dataset_info.json says {expected}: it is '
          'truncated or damaged; prepare it again')
    records += [(record, path) for record in shard]
  return records
