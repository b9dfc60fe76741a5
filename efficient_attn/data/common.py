"""What the task modules share: the Task record, tokenisation, data folders, errors.

Token ids: 0 is padding in every task and never a real symbol. Bytes and 8-bit
pixels map to `value + 1`, so byte-level and pixel tasks have 257 ids (the scheme
of the LRA byte encoder, which reserves 0 for padding).
"""

import dataclasses
import functools
import os
import pathlib
from typing import Any, Callable, Sequence

import grain
import numpy as np

PAD_ID = 0
SPLITS = ('train', 'valid', 'test')
BYTE_VOCAB_SIZE = 257
DEFAULT_DATA_DIRS = ('~/tensorflow_datasets', './data')
LRA_RELEASE_URL = 'https://storage.googleapis.com/long-range-arena/lra_release.gz'


@dataclasses.dataclass(frozen=True)
class Task:
  """A split of a task: a random-access source of examples plus what a model needs to know.

  Attributes:
    name: task name, e.g. 'listops'.
    split: 'train', 'valid' or 'test'.
    source: random-access source (`len`, `[i]`) of example dicts of numpy arrays.
    vocab_size: number of token ids, padding id 0 included.
    num_classes: classes of 'targets' (for language modelling: the vocabulary size).
    seq_len: length every input is padded or cut to.
    pair: True when examples hold two inputs ('inputs1', 'inputs2'), as Retrieval.
    metric: 'accuracy' or 'bits_per_byte'.
    causal_lm: True for next-token prediction, where 'targets' is a sequence.
  """
  name: str
  split: str
  source: Any
  vocab_size: int
  num_classes: int
  seq_len: int
  pair: bool = False
  metric: str = 'accuracy'
  causal_lm: bool = False


class MissingDataError(FileNotFoundError):
  """Raised when the files of a task are not where they are looked for."""


class CorruptDataError(ValueError):
  """Raised when a data file cannot be read completely; the message names the file."""


def read_first_available(source: str, readers: dict):
  """Reads with the reader named `source`, or for 'auto' with the first whose files exist.

  Args:
    source: 'auto' or a key of `readers`.
    readers: name -> zero-argument reader raising MissingDataError when its files
      are absent, in the order 'auto' tries them.

  Returns:
    What the chosen reader returns.
  """
  check_choice('source', source, ('auto', *readers))
  if source != 'auto':
    return readers[source]()
  for read in readers.values():
    try:
      return read()
    except MissingDataError as error:
      last = error
  # The last reader's message names the raw files users most often have and says
  # which other copy would do.
  raise last


def check_choice(argument: str, value, allowed: Sequence) -> None:
  """Raises ValueError naming the allowed values unless `value` is one of them."""
  if value not in allowed:
    raise ValueError(
        f'{argument}={value!r} does not exist; available: {", ".join(map(repr, allowed))}')


def data_dirs(data_dir: str | os.PathLike | None) -> list[pathlib.Path]:
  """The folders searched for data: `data_dir` alone, or the defaults when it is None."""
  if data_dir is not None:
    return [pathlib.Path(data_dir).expanduser()]
  env_dir = os.environ.get('TFDS_DATA_DIR')
  dirs = [env_dir] if env_dir else []
  return [pathlib.Path(d).expanduser() for d in (*dirs, *DEFAULT_DATA_DIRS)]


def find_data(data_dir, candidates: Sequence[str], *, what: str, expected: str,
              download: str, hint: str = '') -> pathlib.Path:
  """The first existing `candidate` path under the data folders.

  Args:
    data_dir: user data folder, or None for the defaults.
    candidates: relative paths to try, in order of preference.
    what: name of the data, for the error message.
    expected: description of the files expected.
    download: where users download the data.
    hint: extra sentence for the error message.

  Returns:
    The path found.

  Raises:
    MissingDataError: naming the files expected, where to download them and where
      to put them.
  """
  for root in data_dirs(data_dir):
    for candidate in candidates:
      path = root / candidate
      if path.exists():
        return path
  raise missing_data_error(data_dir, candidates, what=what, expected=expected,
                           download=download, hint=hint)


def missing_data_error(data_dir, candidates: Sequence[str], *, what: str, expected: str,
                       download: str, hint: str = '') -> MissingDataError:
  """The error for data absent from all data folders; arguments as for `find_data`."""
  del candidates  # `expected` names them for people
  dirs = data_dirs(data_dir)
  searched = '' if data_dir is not None else (
      f' (searched {", ".join(map(str, dirs))}; or pass data_dir)')
  return MissingDataError(
      f'{what} not found. Put {expected} in {dirs[0]}{searched}. Download: {download}. '
      f'{hint}'.strip())


def encode_bytes(text: bytes | str, max_len: int | None = None) -> np.ndarray:
  """Byte-level token ids (byte b -> b + 1), cut to `max_len` bytes."""
  if isinstance(text, str):
    text = text.encode('utf-8')
  data = np.frombuffer(text[:max_len], dtype=np.uint8)
  return data.astype(np.int32) + 1


def decode_bytes(ids: np.ndarray) -> bytes:
  """Bytes of byte-level token ids; padding ids are dropped."""
  ids = np.asarray(ids)
  return (ids[ids != PAD_ID] - 1).astype(np.uint8).tobytes()


def pixels_to_tokens(image: np.ndarray) -> np.ndarray:
  """Flattens an 8-bit grayscale image to a pixel sequence of ids (value + 1)."""
  return np.asarray(image, dtype=np.int32).reshape(-1) + 1


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
  """Luma of uint8 RGB images `[..., 3]`, rounded as tf.image.rgb_to_grayscale (LRA Image)."""
  weights = np.array([0.2989, 0.5870, 0.1140])
  gray = (rgb.astype(np.float64) / 255.0) @ weights
  # Float-to-uint8 conversion scales by 255.5 and truncates.
  return np.clip(gray * 255.5, 0, 255).astype(np.uint8)


class MappedSource:
  """Random-access source applying `fn` to each item of `base` on read.

  Unlike grain's `MapDataset.map`, it keeps the batched read `__getitems__` of TFDS
  data sources (4-6x faster than one by one for array_record files).
  """

  def __init__(self, base, fn: Callable[[Any], dict]):
    self.base = base
    self.fn = fn

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> dict:
    return self.fn(self.base[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    if hasattr(self.base, '__getitems__'):
      return [self.fn(item) for item in self.base.__getitems__(indices)]
    return [self.fn(self.base[i]) for i in indices]

  def __repr__(self) -> str:
    return f'MappedSource({self.base!r}, {getattr(self.fn, "__name__", self.fn)})'


def array_source(inputs: Sequence, targets: Sequence[int]) -> grain.MapDataset:
  """Random-access source of {'inputs': inputs[i], 'targets': targets[i]} examples.

  Args:
    inputs: one `[num, length]` array or a sequence of 1-D arrays (or texts).
    targets: `[num]` class labels.

  Returns:
    A grain MapDataset; `.map(fn)` it to transform the examples on read.
  """
  if len(inputs) != len(targets):
    raise ValueError(f'{len(inputs)} inputs but {len(targets)} targets')
  targets = np.asarray(targets, dtype=np.int32)
  return grain.MapDataset.range(len(targets)).map(
      functools.partial(_array_example, inputs, targets))


def _array_example(inputs: Sequence, targets: np.ndarray, index: int) -> dict:
  """Example `index` of `array_source` (a module function, so that sources pickle)."""
  return {'inputs': inputs[index], 'targets': targets[index]}


def encode_inputs(example: dict, max_len: int) -> dict:
  """`example` with its text 'inputs' as byte ids."""
  return {**example, 'inputs': encode_bytes(example['inputs'], max_len)}
