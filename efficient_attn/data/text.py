"""LRA Text: IMDB movie reviews at byte level, read from a copy the user provides.

Binary sentiment classification of whole reviews, one token per byte, cut to
`seq_len` bytes. The default, 1000, is LRA's released config (the paper reports 1K
to 4K; `seq_len=4096` is one argument away). 25K training and 25K test reviews. As
in LRA, which has no validation set for this task, 'valid' is the test split.

Token ids differ from LRA's on purpose: here byte b is id b + 1 (257 ids, 0 only
padding); LRA used the byte itself (256 ids) and masked `inputs > 0`, so a NUL
byte counted as padding there. Reviews hold no NUL bytes, so only the ids shift.

Data (no download happens here), either of:
  - the TFDS-prepared imdb_reviews folder `<data_dir>/imdb_reviews/plain_text/<version>/`
    (made on a machine with internet by `tfds build imdb_reviews` or
    `tfds.load('imdb_reviews')`, then copied; tfrecord or array_record files);
  - the raw archive aclImdb_v1.tar.gz from https://ai.stanford.edu/~amaas/data/sentiment/,
    extracted so that `<data_dir>/aclImdb/{train,test}/{pos,neg}/*.txt` exist.
"""

import functools
import pathlib
import re

import numpy as np

from efficient_attn.data import common
from efficient_attn.data import tfds_files

IMDB_URL = 'https://ai.stanford.edu/~amaas/data/sentiment/ (aclImdb_v1.tar.gz)'
NUM_CLASSES = 2
DEFAULT_SEQ_LEN = 1000  # LRA's released config
# LRA validated on the test reviews; IMDB has no validation split.
_STORED_SPLIT = {'train': 'train', 'valid': 'test', 'test': 'test'}
_REVIEW_FILE = re.compile(r'^(\d+)_\d+\.txt$')


def read_tfds_imdb(data_dir, split: str) -> tuple[list[bytes], np.ndarray]:
  """Texts and labels (1 = positive) of a split of TFDS-prepared imdb_reviews."""
  version_dir = tfds_files.require_prepared(
      data_dir, 'imdb_reviews', 'plain_text',
      download=f'TFDS (tfds build imdb_reviews) or {IMDB_URL}')
  source = tfds_files.read_split(version_dir, split, fix='copy the prepared imdb_reviews again')
  examples = source.__getitems__(list(range(len(source))))
  return [e['text'] for e in examples], np.asarray([e['label'] for e in examples], np.int32)


def find_acl_imdb(data_dir) -> pathlib.Path:
  """The extracted aclImdb folder."""
  return common.find_data(
      data_dir, ['aclImdb', 'imdb/aclImdb'], what='IMDB reviews',
      expected='aclImdb/ (aclImdb_v1.tar.gz extracted)', download=IMDB_URL,
      hint='A TFDS-prepared imdb_reviews/ folder there works too.')


def _review_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """Review files of one label folder, by review id; error when some are missing."""
  if not folder.is_dir():
    raise common.CorruptDataError(f'{folder} is missing: the aclImdb copy is incomplete')
  numbered = {}
  for path in folder.iterdir():
    match = _REVIEW_FILE.match(path.name)
    if match:
      numbered[int(match.group(1))] = path
  urls = folder.parent / f'urls_{folder.name}.txt'
  expected = len(urls.read_text().splitlines()) if urls.exists() else max(numbered, default=-1) + 1
  missing = sorted(set(range(expected)) - set(numbered))
  if missing or not numbered:
    raise common.CorruptDataError(
        f'{folder} holds {len(numbered)} reviews, expected {expected} (ids 0-{expected - 1}; '
        f'missing e.g. {missing[:3]}): the aclImdb copy is incomplete; extract it again')
  return [numbered[i] for i in range(expected)]


def read_acl_imdb(data_dir, split: str) -> tuple[list[bytes], np.ndarray]:
  """Texts and labels (1 = positive) of a split ('train' or 'test') of the raw aclImdb folder."""
  root = find_acl_imdb(data_dir) / split
  texts, labels = [], []
  for label, name in enumerate(('neg', 'pos')):
    for path in _review_files(root / name):
      text = path.read_bytes()
      if not text:
        raise common.CorruptDataError(f'{path} is empty: the aclImdb copy is damaged')
      texts.append(text)
      labels.append(label)
  return texts, np.asarray(labels, dtype=np.int32)


def read_imdb(data_dir, split: str, source: str = 'auto') -> tuple[list[bytes], np.ndarray]:
  """Texts and labels of a stored IMDB split from the TFDS copy or the raw folder."""
  return common.read_first_available(source, {
      'tfds': lambda: read_tfds_imdb(data_dir, split),
      'aclImdb': lambda: read_acl_imdb(data_dir, split)})


def load(split: str, data_dir=None, seq_len: int | None = None,
         source: str = 'auto') -> common.Task:
  """The LRA Text task.

  Args:
    split: 'train', 'valid' (the test reviews, as LRA) or 'test'.
    data_dir: folder holding imdb_reviews/ or aclImdb/; defaults searched when None.
    seq_len: bytes kept per review; 1000 (LRA's config) when None.
    source: 'auto' (TFDS copy, else raw folder), 'tfds' or 'aclImdb'.

  Returns:
    The Task; examples are {'inputs': int32 [<= seq_len] byte ids, 'targets': int32}.
  """
  common.check_choice('split', split, common.SPLITS)
  seq_len = seq_len or DEFAULT_SEQ_LEN
  texts, labels = read_imdb(data_dir, _STORED_SPLIT[split], source)
  source = common.array_source(texts, labels).map(
      functools.partial(common.encode_inputs, max_len=seq_len))
  return common.Task(name='text', split=split, source=source,
                     vocab_size=common.BYTE_VOCAB_SIZE, num_classes=NUM_CLASSES, seq_len=seq_len)
