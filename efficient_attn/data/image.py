"""LRA Image: CIFAR-10 as 1024-pixel grayscale sequences, read from a copy the user provides.

Each 32x32 colour image becomes grayscale (the luma weights of
tf.image.rgb_to_grayscale, as LRA) and is flattened row by row to 1024 pixel ids
(value + 1, so 0 stays padding); 10 classes. LRA used the pixel value itself (256
ids) and masked `inputs > 0`, so its black pixels were treated as padding; here
every pixel is a real token and the model sees 257 ids.

Splits as in LRA: 'train' is the first 90% of the 50K training images, 'valid'
the last 10%, 'test' the 10K test images. With the TFDS copy these are LRA's
`train[:90%]` and `train[90%:]`; the python batches are in another order (batch
files 1-5 as stored), so there 'valid' is the last 5000 images of data_batch_5.

Data (no download happens here), either of:
  - the TFDS-prepared cifar10 folder `<data_dir>/cifar10/<version>/` (made on a
    machine with internet by `tfds build cifar10`, then copied);
  - the CIFAR-10 python version, cifar-10-python.tar.gz from
    https://www.cs.toronto.edu/~kriz/cifar.html, extracted so that
    `<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}` exist.
"""

import pathlib
import pickle

import numpy as np

from efficient_attn.data import common
from efficient_attn.data import tfds_files

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)'
NUM_CLASSES = 10
IMAGE_SIZE = 32
SEQ_LEN = IMAGE_SIZE * IMAGE_SIZE
TRAIN_FRACTION = 0.9
TRAIN_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
TEST_BATCHES = ('test_batch',)


def read_tfds_cifar(data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
  """RGB images `[n, 32, 32, 3]` and labels of a split ('train' or 'test') of TFDS cifar10."""
  version_dir = tfds_files.require_prepared(
      data_dir, 'cifar10', download=f'TFDS (tfds build cifar10) or {CIFAR_URL}')
  source = tfds_files.read_split(version_dir, split, fix='copy the prepared cifar10 again')
  examples = source.__getitems__(list(range(len(source))))
  return (np.stack([e['image'] for e in examples]),
          np.asarray([e['label'] for e in examples], np.int32))


def find_python_batches(data_dir) -> pathlib.Path:
  """The extracted cifar-10-batches-py folder."""
  return common.find_data(
      data_dir, ['cifar-10-batches-py', 'cifar10/cifar-10-batches-py'],
      what='CIFAR-10', expected='cifar-10-batches-py/ (cifar-10-python.tar.gz extracted)',
      download=CIFAR_URL, hint='A TFDS-prepared cifar10/ folder there works too.')


def read_python_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """RGB images `[n, 32, 32, 3]` and labels of one pickled CIFAR-10 batch file."""
  if not path.exists():
    raise common.CorruptDataError(f'{path} is missing: the CIFAR-10 copy is incomplete')
  try:
    with open(path, 'rb') as f:
      batch = pickle.load(f, encoding='bytes')
    data = np.asarray(batch[b'data'], dtype=np.uint8)
    labels = np.asarray(batch[b'labels'], dtype=np.int32)
  except Exception as error:  # truncated pickles raise EOFError, UnpicklingError, ...
    raise common.CorruptDataError(f'cannot read CIFAR-10 batch {path}: {error}') from error
  if data.ndim != 2 or data.shape[1] != 3 * SEQ_LEN or len(data) != len(labels):
    raise common.CorruptDataError(
        f'{path}: expected data [n, {3 * SEQ_LEN}] and n labels, got {data.shape} and '
        f'{labels.shape}')
  if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
    raise common.CorruptDataError(f'{path} holds labels outside 0-{NUM_CLASSES - 1}')
  # Rows hold the red, green and blue planes one after the other.
  images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
  return images, labels


def read_python_cifar(data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
  """RGB images and labels of a split ('train' or 'test') of the python batches."""
  folder = find_python_batches(data_dir)
  names = TRAIN_BATCHES if split == 'train' else TEST_BATCHES
  parts = [read_python_batch(folder / name) for name in names]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar(data_dir, split: str, source: str = 'auto') -> tuple[np.ndarray, np.ndarray]:
  """RGB images and labels of a stored split from the TFDS copy or the python batches."""
  return common.read_first_available(source, {
      'tfds': lambda: read_tfds_cifar(data_dir, split),
      'python': lambda: read_python_cifar(data_dir, split)})


def load(split: str, data_dir=None, seq_len: int | None = None,
         source: str = 'auto') -> common.Task:
  """The LRA Image task.

  Args:
    split: 'train', 'valid' or 'test'.
    data_dir: folder holding cifar10/ or cifar-10-batches-py/; defaults searched when None.
    seq_len: must be 1024 (or None).
    source: 'auto' (TFDS copy, else python batches), 'tfds' or 'python'.

  Returns:
    The Task; examples are {'inputs': uint16 [1024] pixel ids, 'targets': int32}.
  """
  common.check_choice('split', split, common.SPLITS)
  if seq_len not in (None, SEQ_LEN):
    raise ValueError(f'CIFAR-10 images are {SEQ_LEN} pixels long, not {seq_len}')
  images, labels = read_cifar(data_dir, 'test' if split == 'test' else 'train', source)
  if split != 'test':
    cut = int(len(labels) * TRAIN_FRACTION)
    part = slice(0, cut) if split == 'train' else slice(cut, None)
    images, labels = images[part], labels[part]
  # uint16 halves the memory of int32; batches are int32.
  tokens = common.rgb_to_gray(images).reshape(len(images), SEQ_LEN).astype(np.uint16) + 1
  return common.Task(name='image', split=split, source=common.array_source(tokens, labels),
                     vocab_size=common.BYTE_VOCAB_SIZE, num_classes=NUM_CLASSES, seq_len=SEQ_LEN)
