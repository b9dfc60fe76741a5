"""Text, Retrieval and Image readers on small files in the real formats, written here."""

import io
import json
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

def example_bytes(features: dict) -> bytes:
  """A serialized tf.train.Example of {name: bytes or int}."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  example = tf_example_pb2.Example()
  for name, value in features.items():
    if isinstance(value, bytes):
      example.features.feature[name].bytes_list.value.append(value)
    else:
      example.features.feature[name].int64_list.value.append(value)
  return example.SerializeToString()


def tfrecord_bytes(records: list[bytes]) -> bytes:
  """TFRecord framing: length, masked CRC of length, data, masked CRC of data."""
  out = []
  for record in records:
    header = struct.pack('<Q', len(record))
    out += [header, struct.pack('<I', tfds_files.masked_crc32c(header)), record,
            struct.pack('<I', tfds_files.masked_crc32c(record))]
  return b''.join(out)


def write_tfds_folder(folder, name: str, splits: dict, file_format: str = 'tfrecord'):
  """A TFDS-prepared version folder with one shard per split of serialized Examples."""
  folder.mkdir(parents=True)
  info = {'name': name, 'version': '1.0.0', 'splits': []}
  for split, records in splits.items():
    path = folder / f'{name}-{split}.{file_format}-00000-of-00001'
    if file_format == 'tfrecord':
      path.write_bytes(tfrecord_bytes(records))
    else:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
      for record in records:
        writer.write(record)
      writer.close()
    info['splits'].append({'name': split, 'shardLengths': [str(len(records))]})
  (folder / 'dataset_info.json').write_text(json.dumps(info))


def test_crc32c_known_value():
  assert tfds_files.crc32c(b'123456789') == 0xE3069283


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


def imdb_records(split: str) -> list[bytes]:
  return [example_bytes({'text': text, 'label': int(label == 'pos')})
          for label, texts in REVIEWS[split].items() for text in texts]


def test_text_from_tfds_prepared_folder(tmp_path):
  folder = tmp_path / 'imdb_reviews' / 'plain_text' / '1.0.0'
  write_tfds_folder(folder, 'imdb_reviews', {s: imdb_records(s) for s in REVIEWS})
  task = get_task('text', tmp_path, split='test', source='tfds')
  assert [task.source[i]['inputs'].tolist() for i in range(3)] == [
      ids(b'Fine'), ids(b'Awful acting'), ids(b'No')]
  assert [int(task.source[i]['targets']) for i in range(3)] == [1, 0, 0]


def test_tfds_truncated_or_short_file_is_named(tmp_path):
  folder = tmp_path / 'imdb_reviews' / 'plain_text' / '1.0.0'
  write_tfds_folder(folder, 'imdb_reviews', {s: imdb_records(s) for s in REVIEWS})
  shard = folder / 'imdb_reviews-train.tfrecord-00000-of-00001'
  data = shard.read_bytes()
  shard.write_bytes(data[:-7])
  with pytest.raises(CorruptDataError, match='train.tfrecord-00000-of-00001 is truncated'):
    get_task('text', tmp_path, source='tfds')
  shard.write_bytes(tfrecord_bytes(imdb_records('train')[:2]))
  with pytest.raises(CorruptDataError, match='holds 2 records, dataset_info.json says 3'):
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


def test_image_from_tfds_array_record_folder(tmp_path):
  splits, images = {}, {}
  for split, count in (('train', 10), ('test', 3)):
    images[split], labels = cifar_images(count, seed=count)
    records = []
    for image, label in zip(images[split], labels):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format='PNG')
      records.append(example_bytes({'id': b'x', 'image': png.getvalue(), 'label': int(label)}))
    splits[split] = records
  write_tfds_folder(tmp_path / 'cifar10' / '3.0.2', 'cifar10', splits, 'array_record')
  task = get_task('image', tmp_path, split='test', source='tfds')
  np.testing.assert_array_equal(task.source[1]['inputs'], expected_tokens(images['test'][1:2])[0])


def test_gray_matches_formula():
  rgb = np.array([[[255, 255, 255], [0, 0, 0], [10, 200, 30]]], dtype=np.uint8)
  # (0.2989 * 10 + 0.5870 * 200 + 0.1140 * 30) / 255 * 255.5 = 124.05
  assert common.rgb_to_gray(rgb).tolist() == [[255, 0, 124]]
