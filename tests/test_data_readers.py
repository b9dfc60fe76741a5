"""Text, Retrieval and Image readers on small files in the real formats, written here."""

import io
import json
import pathlib
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from efficient_attn.data import CorruptDataError, MissingDataError, get_task, make_batches
from efficient_attn.data import common, tfds_files

REVIEWS = {'train': {'pos': [b'Great film.', b'Loved it <br /> truly'], 'neg': [b'Dull.']},
           'test': {'pos': [b'Fine'], 'neg': [b'Awful acting', b'No']}}


def ids(text: bytes) -> list[int]:
  return [b + 1 for b in text]


# --- TFDS-prepared folders ---------------------------------------------------------------------

def write_prepared(monkeypatch, root, name: str, splits: dict) -> pathlib.Path:
  """A folder that TFDS's own `name` builder (its real features) prepared from `splits`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=str(root), file_format='array_record')
  monkeypatch.setattr(type(builder), '_split_generators',
                      lambda self, dl_manager: {s: enumerate(e) for s, e in splits.items()})
  builder.download_and_prepare()
  return pathlib.Path(builder.data_path)


def crc32c(pieces: list[bytes]) -> list[int]:
  """CRC-32C of each piece."""
  lengths = np.array([len(p) for p in pieces], dtype=np.int64)
  starts = np.cumsum(lengths) - lengths
  data = np.frombuffer(b''.join(pieces), dtype=np.uint8)
  return tfds_files.crc32c_many(data, starts, lengths).tolist()


def tfrecord_bytes(records: list[bytes]) -> bytes:
  """TFRecord framing: length, masked CRC of length, data, masked CRC of data."""
  headers = [struct.pack('<Q', len(record)) for record in records]
  crcs = [struct.pack('<I', c) for c in tfds_files.mask_crc(crc32c(headers + records))]
  return b''.join(header + crcs[i] + record + crcs[len(records) + i]
                  for i, (header, record) in enumerate(zip(headers, records)))


def as_tfrecord(version_dir: pathlib.Path) -> None:
  """Rewrites a prepared array_record folder as the TFRecord folder `tfds build` writes."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  for path in version_dir.glob('*.array_record-*'):
    reader = array_record_module.ArrayRecordReader(str(path))
    records = reader.read_all()
    reader.close()
    path.with_name(path.name.replace('.array_record-', '.tfrecord-')).write_bytes(
        tfrecord_bytes(records))
    path.unlink()
  info = json.loads((version_dir / 'dataset_info.json').read_text())
  info['fileFormat'] = 'tfrecord'
  (version_dir / 'dataset_info.json').write_text(json.dumps(info))


def test_crc32c_known_values():
  assert crc32c([b'123456789', b'', b'a']) == [0xE3069283, 0, 0xC1D04330]
  long = bytes(range(256)) * 3
  assert crc32c([long, b'123456789'])[1] == 0xE3069283  # a long piece beside a short one


# --- Text ------------------------------------------------------------------------------------

def write_acl_imdb(root):
  """A fake aclImdb folder laid out as the real archive."""
  for split, labels in REVIEWS.items():
    for label, texts in labels.items():
      folder = root / 'aclImdb' / split / label
      folder.mkdir(parents=True)
      for i, text in enumerate(texts):
        (folder / f'{i}_{7 if label == "pos" else 2}.txt').write_bytes(text)
      urls = ''.join(f'http://www.imdb.com/title/tt{i}/usercomments\n' for i in range(len(texts)))
      (root / 'aclImdb' / split / f'urls_{label}.txt').write_text(urls)


def test_text_from_raw_acl_imdb(tmp_path):
  write_acl_imdb(tmp_path)
  task = get_task('text', tmp_path, split='train', seq_len=12)
  assert (len(task.source), task.vocab_size, task.num_classes, task.seq_len) == (3, 257, 2, 12)
  examples = [task.source[i] for i in range(3)]
  assert [e['inputs'].tolist() for e in examples] == [
      ids(b'Dull.'), ids(b'Great film.'), ids(b'Loved it <br')]
  assert [int(e['targets']) for e in examples] == [0, 1, 1]
  valid = get_task('text', tmp_path, split='valid')
  assert len(valid.source) == 3  # the test reviews, as LRA
  batch = next(make_batches(task, 2, shard_index=0, shard_count=1))
  assert batch['inputs'].shape == (2, 12)


def test_text_missing_data_names_files_and_source(tmp_path):
  with pytest.raises(MissingDataError) as error:
    get_task('text', tmp_path)
  message = str(error.value)
  for part in ('aclImdb', 'ai.stanford.edu/~amaas/data/sentiment', 'imdb_reviews', str(tmp_path)):
    assert part in message


def test_text_incomplete_or_empty_files_are_named(tmp_path):
  write_acl_imdb(tmp_path)
  (tmp_path / 'aclImdb/train/pos/0_7.txt').unlink()
  with pytest.raises(CorruptDataError, match='aclImdb/train/pos'):
    get_task('text', tmp_path)
  (tmp_path / 'aclImdb/train/pos/0_7.txt').write_bytes(b'')
  with pytest.raises(CorruptDataError, match='0_7.txt is empty'):
    get_task('text', tmp_path)


def write_tfds_imdb(monkeypatch, root, file_format: str) -> pathlib.Path:
  """A TFDS-prepared imdb_reviews folder of REVIEWS in `file_format`; returns its version folder."""
  splits = {split: [{'text': text, 'label': int(label == 'pos')}
                    for label, texts in labels.items() for text in texts]
            for split, labels in REVIEWS.items()}
  version_dir = write_prepared(monkeypatch, root, 'imdb_reviews', splits)
  if file_format == 'tfrecord':
    as_tfrecord(version_dir)
  return version_dir


def reviews(task) -> list[tuple[list[int], int]]:
  return sorted((task.source[i]['inputs'].tolist(), int(task.source[i]['targets']))
                for i in range(len(task.source)))


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_text_from_tfds_prepared_folder(tmp_path, monkeypatch, file_format):
  write_tfds_imdb(monkeypatch, tmp_path, file_format)
  task = get_task('text', tmp_path, split='test', source='tfds')
  assert reviews(task) == sorted([(ids(b'Fine'), 1), (ids(b'Awful acting'), 0), (ids(b'No'), 0)])


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_tfds_damaged_record_is_named(tmp_path, monkeypatch, file_format):
  version_dir = write_tfds_imdb(monkeypatch, tmp_path, file_format)
  text = b'Loved it <br /> truly'
  stored = [e['text'] for e in tfds_files.read_split(version_dir, 'train', fix='copy it')]
  shard = next(version_dir.glob(f'imdb_reviews-train.{file_format}-*'))
  data = bytearray(shard.read_bytes())
  data[data.index(text) + 3] ^= 1
  shard.write_bytes(bytes(data))
  with pytest.raises(CorruptDataError, match=f'{shard.name} is damaged: record {stored.index(text)}'
                     '.*; copy it$'):
    tfds_files.read_split(version_dir, 'train', fix='copy it').__getitems__([0, 1, 2])
  with pytest.raises(CorruptDataError, match=shard.name):
    get_task('text', tmp_path, source='tfds')


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_tfds_truncated_file_is_named(tmp_path, monkeypatch, file_format):
  version_dir = write_tfds_imdb(monkeypatch, tmp_path, file_format)
  shard = next(version_dir.glob(f'imdb_reviews-train.{file_format}-*'))
  data = shard.read_bytes()
  cut = len(data) - 7 if file_format == 'tfrecord' else len(data) // 2
  shard.write_bytes(data[:cut])
  with pytest.raises(CorruptDataError, match=shard.name):
    get_task('text', tmp_path, source='tfds')


def test_tfds_short_file_is_named(tmp_path, monkeypatch):
  version_dir = write_tfds_imdb(monkeypatch, tmp_path, 'tfrecord')
  shard = next(version_dir.glob('imdb_reviews-train.tfrecord-*'))
  shard.write_bytes(tfrecord_bytes(tfds_files.read_tfrecord(shard)[:2]))
  message = f'{shard.name} holds 2 records, dataset_info.json says 3'
  with pytest.raises(CorruptDataError, match=message):
    get_task('text', tmp_path, source='tfds')


# --- Retrieval -------------------------------------------------------------------------------

PAIRS = [(1, b'A study of parsing.', b'Parsing revisited'), (0, b'Speech', b'Vision and more'),
         (1, b'x' * 50, b'y' * 3)]


def write_aan(root, lines_per_split=None):
  folder = root / 'lra_release' / 'tsv_data'
  folder.mkdir(parents=True)
  for name in ('train', 'eval', 'test'):
    lines = [f'{label}\tid{i}a\tid{i}b\t'.encode() + a + b'\t' + b + b'\n'
             for i, (label, a, b) in enumerate(lines_per_split or PAIRS)]
    (folder / f'new_aan_pairs.{name}.tsv').write_bytes(b''.join(lines))
  return folder


def test_retrieval_pairs(tmp_path):
  write_aan(tmp_path)
  task = get_task('retrieval', tmp_path, split='valid', seq_len=10)
  assert task.pair and len(task.source) == 3
  example = task.source[0]
  assert example['inputs1'].tolist() == ids(b'A study of')
  assert example['inputs2'].tolist() == ids(b'Parsing re')
  assert [int(task.source[i]['targets']) for i in range(3)] == [1, 0, 1]
  batch = next(make_batches(task, 2, shard_index=0, shard_count=1))
  assert set(batch) == {'inputs1', 'mask1', 'inputs2', 'mask2', 'targets', 'weights'}
  assert batch['mask2'][0].sum() == 10


def test_retrieval_missing_names_files_and_archive(tmp_path):
  with pytest.raises(MissingDataError) as error:
    get_task('retrieval', tmp_path)
  message = str(error.value)
  for part in ('new_aan_pairs.train.tsv', 'lra_release.gz', str(tmp_path)):
    assert part in message
  assert len(message) < 300


def test_retrieval_truncated_file_is_named(tmp_path):
  folder = write_aan(tmp_path)
  path = folder / 'new_aan_pairs.train.tsv'
  data = path.read_bytes()
  path.write_bytes(data[:data.rindex(b'\t') - 2])
  with pytest.raises(CorruptDataError, match=r'new_aan_pairs.train.tsv, line 3'):
    get_task('retrieval', tmp_path)
  path.write_bytes(data.replace(b'0\tid1a', b'maybe\tid1a'))
  with pytest.raises(CorruptDataError, match='line 2: label'):
    get_task('retrieval', tmp_path)


# --- Image -----------------------------------------------------------------------------------

def cifar_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count)


def write_cifar_batches(root, per_batch: int = 4):
  """Fake python-version CIFAR-10 batches; returns the train and test images and labels."""
  folder = root / 'cifar-10-batches-py'
  folder.mkdir()
  written = {}
  train_names = [f'data_batch_{i}' for i in range(1, 6)]
  for split, names in (('train', train_names), ('test', ['test_batch'])):
    images, labels = cifar_images(per_batch * len(names), seed=len(split))
    for k, name in enumerate(names):
      part = slice(k * per_batch, (k + 1) * per_batch)
      rows = images[part].transpose(0, 3, 1, 2).reshape(per_batch, 3072)
      with open(folder / name, 'wb') as f:
        pickle.dump({b'data': rows, b'labels': labels[part].tolist()}, f)
    written[split] = (images, labels)
  return folder, written


def expected_tokens(rgb: np.ndarray) -> np.ndarray:
  gray = rgb.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140]) / 255.0
  return np.floor(gray * 255.5).astype(np.int64).reshape(len(rgb), -1) + 1


def test_image_from_python_batches(tmp_path):
  _, written = write_cifar_batches(tmp_path)
  train = get_task('image', tmp_path, split='train')
  valid = get_task('image', tmp_path, split='valid')
  test = get_task('image', tmp_path, split='test')
  assert (len(train.source), len(valid.source), len(test.source)) == (18, 2, 4)
  assert (train.seq_len, train.vocab_size, train.num_classes) == (1024, 257, 10)
  images, labels = written['train']
  np.testing.assert_array_equal(train.source[3]['inputs'], expected_tokens(images[3:4])[0])
  np.testing.assert_array_equal(valid.source[1]['inputs'], expected_tokens(images[19:20])[0])
  assert valid.source[1]['targets'] == labels[19]
  assert test.source[2]['targets'] == written['test'][1][2]


def test_image_missing_and_truncated_batches_are_named(tmp_path):
  with pytest.raises(MissingDataError) as error:
    get_task('image', tmp_path)
  assert 'cifar-10-batches-py' in str(error.value) and 'cs.toronto.edu' in str(error.value)
  folder, _ = write_cifar_batches(tmp_path)
  batch = folder / 'data_batch_3'
  batch.write_bytes(batch.read_bytes()[:1000])
  with pytest.raises(CorruptDataError, match='data_batch_3'):
    get_task('image', tmp_path)
  batch.unlink()
  with pytest.raises(CorruptDataError, match='data_batch_3 is missing'):
    get_task('image', tmp_path)


def png_bytes(image: np.ndarray) -> io.BytesIO:
  png = io.BytesIO()
  Image.fromarray(image).save(png, format='PNG')
  png.seek(0)
  return png


def test_image_from_tfds_prepared_folder(tmp_path, monkeypatch):
  splits, expected = {}, {}
  for split, count in (('train', 10), ('test', 3)):
    images, labels = cifar_images(count, seed=count)
    splits[split] = [{'id': f'{split}_{i}', 'image': png_bytes(image), 'label': int(label)}
                     for i, (image, label) in enumerate(zip(images, labels))]
    expected[split] = sorted(zip(expected_tokens(images).tolist(), labels.tolist()))
  write_prepared(monkeypatch, tmp_path, 'cifar10', splits)
  read = {}
  for split in ('train', 'valid', 'test'):
    source = get_task('image', tmp_path, split=split, source='tfds').source
    read[split] = [(source[i]['inputs'].tolist(), int(source[i]['targets']))
                   for i in range(len(source))]
  assert (len(read['train']), len(read['valid'])) == (9, 1)  # LRA: train[:90%] in TFDS order
  assert sorted(read['train'] + read['valid']) == expected['train']
  assert sorted(read['test']) == expected['test']


def test_gray_matches_formula():
  rgb = np.array([[[255, 255, 255], [0, 0, 0], [10, 200, 30]]], dtype=np.uint8)
  # (0.2989 * 10 + 0.5870 * 200 + 0.1140 * 30) / 255 * 255.5 = 124.05
  assert common.rgb_to_gray(rgb).tolist() == [[255, 0, 124]]
