"""Reader of the official LRA Pathfinder files (lra_release.gz), split as LRA split them.

A folder such as lra_release/pathfinder32/curv_contour_length_14 holds
metadata/<n>.npy (text despite the name; each line reads
`imgs/<n> sample_<i>.png <i> <label> ...`) and the PNG images. LRA's TFDS builder
(lra_benchmarks/data/pathfinder.py) keyed the i-th line of each metadata file as
`imgs/<n>_sample_<i>.png_<i + 1>`, and TFDS stored the examples sorted by the md5
hash of the split name ('easy', 'intermediate', 'hard') followed by the key. LRA's
input pipeline took [:80%], [80%:90%] and [90%:] of that order (rounded to the
closest example) and then left out the empty images, so the splits here are the
same images in the same order. Missing or empty images raise CorruptDataError
unless `skip_bad_images`, which leaves them out after slicing as LRA did.
"""

import hashlib
import logging
import os
import pathlib

import numpy as np

from efficient_attn.data import common

RESOLUTIONS = (32, 64, 128, 256)
DIFFICULTY_FOLDERS = {
    'easy': 'curv_baseline',
    'intermediate': 'curv_contour_length_9',
    'hard': 'curv_contour_length_14',
}
SPLIT_PERCENTS = {'train': (0, 80), 'valid': (80, 90), 'test': (90, 100)}


def find_folder(data_dir, resolution: int, difficulty: str) -> pathlib.Path:
  """The folder of official LRA Pathfinder files, e.g. .../pathfinder32/curv_contour_length_14."""
  common.check_choice('resolution', resolution, RESOLUTIONS)
  common.check_choice('difficulty', difficulty, tuple(DIFFICULTY_FOLDERS))
  tail = f'pathfinder{resolution}/{DIFFICULTY_FOLDERS[difficulty]}'
  dirs = common.data_dirs(data_dir)
  for root in dirs:
    for candidate in (f'lra_release/{tail}', f'lra_release/lra_release/{tail}', tail):
      if (root / candidate).is_dir():
        return root / candidate
  raise common.MissingDataError(
      f'LRA Pathfinder-{resolution} ({difficulty}) not found: no lra_release/{tail} in '
      f'{", ".join(map(str, dirs))}. Download {common.LRA_RELEASE_URL} and extract it '
      f'into {dirs[0]} (or pass data_dir).')


def read_metadata(folder: pathlib.Path) -> tuple[list[pathlib.Path], np.ndarray, list[str]]:
  """Image paths, labels and LRA's TFDS keys of the lines of an LRA Pathfinder folder."""
  metadata_files = sorted((folder / 'metadata').glob('*.npy'),
                          key=lambda p: (len(p.stem), p.stem))
  if not metadata_files:
    raise common.CorruptDataError(f'{folder / "metadata"} holds no *.npy metadata files')
  paths, labels, keys = [], [], []
  for metadata in metadata_files:
    # As LRA: one line per example, each ending with a newline.
    for number, line in enumerate(metadata.read_text().split('\n')[:-1], 1):
      fields = line.split(' ')
      if len(fields) < 4 or fields[3] not in ('0', '1'):
        raise common.CorruptDataError(
            f'{metadata}, line {number}: expected "<dir> <file> <index> <0|1> ...", got {line!r}')
      paths.append(folder / fields[0] / fields[1])
      labels.append(int(fields[3]))
      keys.append(f'{fields[0]}_{fields[1]}_{number}')
  return paths, np.asarray(labels, dtype=np.int32), keys


def tfds_order(keys: list[str], split_name: str) -> np.ndarray:
  """The order in which TFDS stores examples of `keys`: by md5 of split name then key."""
  salted = hashlib.md5(split_name.encode())

  def key_hash(key: str) -> int:
    md5 = salted.copy()
    md5.update(key.encode())
    return int(md5.hexdigest(), 16)

  return np.array(sorted(range(len(keys)), key=lambda i: key_hash(keys[i])), dtype=np.int64)


def _present(paths: list[pathlib.Path]) -> np.ndarray:
  """Whether each image file exists and is not empty."""
  sizes = {}
  for folder in {p.parent for p in paths}:
    if folder.is_dir():
      with os.scandir(folder) as entries:
        sizes.update({folder / entry.name: entry.stat().st_size for entry in entries})
  return np.array([sizes.get(p, 0) > 0 for p in paths], dtype=bool)


def read_png(path: pathlib.Path, size: int) -> np.ndarray:
  """A grayscale PNG as uint8 `[size, size]`; CorruptDataError naming the file otherwise."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert('L'))
  except Exception as error:  # PIL raises several types for damaged files
    raise common.CorruptDataError(f'cannot decode image {path}: {error}') from error
  if pixels.shape != (size, size):
    raise common.CorruptDataError(f'{path} is {pixels.shape}, expected ({size}, {size})')
  return pixels


class LraPathfinderSource:
  """Random-access source of official LRA Pathfinder images, decoded on read."""

  def __init__(self, paths: list[pathlib.Path], labels: np.ndarray, resolution: int):
    self.paths = paths
    self.labels = labels
    self.resolution = resolution

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    image = read_png(self.paths[index], self.resolution)
    return {'inputs': common.pixels_to_tokens(image), 'targets': np.int32(self.labels[index])}

  def __repr__(self) -> str:
    return f'LraPathfinderSource({len(self)} images of {self.resolution} px)'


def source(split: str, data_dir, resolution: int, difficulty: str,
           skip_bad_images: bool = False) -> LraPathfinderSource:
  """A split of the official files, as LRA built it.

  Args:
    split: 'train', 'valid' or 'test'.
    data_dir: data folder; defaults searched when None.
    resolution: 32, 64, 128 or 256.
    difficulty: 'easy', 'intermediate' or 'hard'.
    skip_bad_images: leave out (with a warning) the split's missing or empty images.

  Returns:
    The split's images in LRA's order.
  """
  common.check_choice('split', split, tuple(SPLIT_PERCENTS))
  folder = find_folder(data_dir, resolution, difficulty)
  paths, labels, keys = read_metadata(folder)
  order = tfds_order(keys, difficulty)
  low, high = (int(round(p * len(order) / 100)) for p in SPLIT_PERCENTS[split])
  chosen = order[low:high]
  good = _present([paths[i] for i in chosen])
  if not good.all():
    bad = [str(paths[i]) for i in chosen[~good][:3]]
    message = f'{int((~good).sum())} images of the {split} split are missing or empty, e.g. {bad}'
    if not skip_bad_images:
      raise common.CorruptDataError(
          f'{message}; pass skip_bad_images=True to leave them out (as LRA did)')
    logging.warning('%s; leaving them out', message)
    chosen = chosen[good]
  return LraPathfinderSource([paths[i] for i in chosen], labels[chosen], resolution)
