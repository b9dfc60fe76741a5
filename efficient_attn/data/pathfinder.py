"""Pathfinder (Linsley et al. 2018) as in Long Range Arena: generated here, or read from LRA files.

An image shows two marker dots and several curved dashed paths; the label says
whether one path joins the dots. Both classes draw two long target paths whose
starts lie close together: a positive image marks both ends of one of them, a
negative one marks the start of one and the far end of the other, so the distance
between the dots gives nothing away. Shorter distractor paths and single dashes
fill the rest. Paths never touch each other, so connectivity is exactly the label.

Resolutions 32, 64, 128 (Path-X) and 256; difficulty is the number of segments
of the target paths: easy 6, intermediate 9, hard 14 (LRA's setting), extreme 20.
Distractors have a third of that many segments. Labels are balanced and a seed
fixes every image. Drawing uses numpy only, many images at a time: segment pixels
come from precomputed patterns for 64 headings and 4x4 sub-pixel starts. Images
are 8-bit grayscale, flattened row by row to a pixel sequence of ids value + 1
(so 0 stays padding), 257 ids, 2 classes. Configs `res<R>_<difficulty>` hold
160K/20K/20K train/valid/test images (LRA's 80/10/10 proportions); 'tiny' is
for tests.

Prepare the generated data once:
  python -m efficient_attn.data.prepare pathfinder --resolution 32 --difficulty hard

Users with the official files (lra_release.gz from the LRA repository, folders
pathfinder32/ ... pathfinder256/ with curv_baseline, curv_contour_length_9 and
curv_contour_length_14) read them with `source='lra_release'`.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import pathlib
from typing import Callable, Iterator

import numpy as np

from efficient_attn.data import common

RESOLUTIONS = (32, 64, 128, 256)
DIFFICULTIES = {'easy': 6, 'intermediate': 9, 'hard': 14, 'extreme': 20}
SPLITS = ('train', 'valid', 'test')
NUM_CLASSES = 2
INK = 255
# Attempts per chunk, headings, sub-pixel bins and candidate rounds are part of what
# a seed means: changing them changes the images. About a third of the attempts at
# 32 px, two thirds at 128 px, succeed.
IMAGES_PER_DRAW = {32: 4096, 64: 1024, 128: 256, 256: 64}
HEADINGS = 64
SUBPIXELS = 4
# Candidate segments tried per round, in order, until one fits.
TRIAL_ROUNDS = (1, 4, 15)
# Blocked paths bend harder with each candidate, up to this many radians.
MAX_BEND = 2.2
# A segment may touch its own path's previous segment, never older ones.
OWN_SEGMENTS_ALLOWED = 1
MAX_SEGMENTS = 63
_TARGETS = (1, 2)


@dataclasses.dataclass(frozen=True)
class PathfinderSetting:
  """Drawing parameters, split sizes and seed of a Pathfinder data set (lengths in pixels)."""
  resolution: int = 32
  contour_length: int = 14
  paddle_length: int = 2
  gap: int = 1
  thickness: int = 1
  margin: int = 1
  marker_radius: float = 1.5
  seed_distance: float = 7.0
  num_distractors: int = 5
  distractor_length: int = 4
  num_fragments: int = 4
  max_turn: float = 0.5
  border: int = 1
  num_train: int = 160_000
  num_valid: int = 20_000
  num_test: int = 20_000
  seed: int = 0

  def split_sizes(self) -> dict[str, int]:
    """Number of examples of each split."""
    return {'train': self.num_train, 'valid': self.num_valid, 'test': self.num_test}


# Per resolution: dash, gap, line thickness, spacing between paths, marker
# radius, distance between the target starts, distractor budget (total segments),
# single dashes.
_STYLES = {
    32: (2, 1, 1, 1, 1.5, 7.0, 20, 4),
    64: (4, 2, 1, 1, 2.5, 12.0, 22, 6),
    128: (8, 3, 2, 2, 3.5, 20.0, 35, 10),
    256: (16, 5, 3, 3, 5.5, 36.0, 30, 12),
}


def make_setting(resolution: int = 32, difficulty: str = 'hard', **overrides) -> PathfinderSetting:
  """The setting of a resolution and difficulty, with optional field overrides."""
  common.check_choice('resolution', resolution, RESOLUTIONS)
  common.check_choice('difficulty', difficulty, tuple(DIFFICULTIES))
  dash, gap, thickness, margin, marker, seed_distance, budget, fragments = _STYLES[resolution]
  contour = DIFFICULTIES[difficulty]
  distractor_length = max(1, contour // 3)
  fields = dict(resolution=resolution, contour_length=contour, paddle_length=dash, gap=gap,
                thickness=thickness, margin=margin, marker_radius=marker,
                seed_distance=seed_distance, num_distractors=round(budget / distractor_length),
                distractor_length=distractor_length, num_fragments=fragments)
  fields.update(overrides)
  return PathfinderSetting(**fields)


def config_name(resolution: int, difficulty: str) -> str:
  """TFDS config name of a resolution and difficulty."""
  return f'res{resolution}_{difficulty}'


SETTINGS = {config_name(r, d): make_setting(r, d) for r in RESOLUTIONS for d in DIFFICULTIES}
SETTINGS['tiny'] = make_setting(32, 'hard', num_train=256, num_valid=64, num_test=64)


def _block(low: int, high: int) -> np.ndarray:
  """Offsets (dy, dx) of the square block [low, high]^2, `[count, 2]`."""
  span = np.arange(low, high + 1)
  return np.stack(np.meshgrid(span, span, indexing='ij'), -1).reshape(-1, 2)


def _disk(radius: float) -> np.ndarray:
  """Offsets (dy, dx) within `radius` of the origin, `[count, 2]`."""
  square = _block(-int(radius), int(radius))
  return square[(square ** 2).sum(1) <= radius ** 2]


def _dilate(offsets: np.ndarray, by: np.ndarray) -> np.ndarray:
  """Distinct sums of an offset from `offsets` and one from `by`."""
  return np.unique((offsets[:, None, :] + by[None, :, :]).reshape(-1, 2), axis=0)


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
  """Stacks 1-D arrays, repeating each one's first entry up to the longest length."""
  width = max(len(r) for r in rows)
  return np.stack([np.concatenate([r, np.full(width - len(r), r[0])]) for r in rows])


class _Patterns:
  """The pixels of a segment for each quantised heading and sub-pixel start.

  Pattern `(heading * SUBPIXELS + y_bin) * SUBPIXELS + x_bin` lists flat offsets, in a
  canvas `width` pixels wide, from the pixel holding the segment's start: `solid`
  (the segment without its gap), `clear` (solid grown by the margin: no other path
  may be there) and `dash` (the inked part). `extent` is its solid's
  (min dy, max dy, min dx, max dx).
  """

  def __init__(self, setting: PathfinderSetting, width: int):
    step = setting.paddle_length + setting.gap
    low, high = -((setting.thickness - 1) // 2), setting.thickness // 2
    line = _block(low, high)
    clear = _block(low - setting.margin, high + setting.margin)
    solid_t = np.arange(0.0, step + 0.25, 0.5)
    dash_t = np.arange(0.0, setting.paddle_length - 1 + 0.25, 0.5)
    solid, zone, dash, extent = [], [], [], []
    for heading in range(HEADINGS):
      angle = 2 * np.pi * heading / HEADINGS
      direction = np.array([np.sin(angle), np.cos(angle)])
      for y_bin in range(SUBPIXELS):
        for x_bin in range(SUBPIXELS):
          start = (np.array([y_bin, x_bin]) + 0.5) / SUBPIXELS
          centres = np.rint(start + solid_t[:, None] * direction).astype(np.int64)
          dash_centres = np.rint(start + dash_t[:, None] * direction).astype(np.int64)
          pixels = _dilate(centres, line)
          extent.append([pixels[:, 0].min(), pixels[:, 0].max(),
                         pixels[:, 1].min(), pixels[:, 1].max()])
          solid.append(pixels @ [width, 1])
          zone.append(_dilate(centres, clear) @ [width, 1])
          dash.append(_dilate(dash_centres, line) @ [width, 1])
    self.solid, self.clear, self.dash = _pad_rows(solid), _pad_rows(zone), _pad_rows(dash)
    self.extent = np.array(extent)


class _Canvas:
  """A batch of images being drawn, with a map of which path owns each pixel.

  Maps are flat and padded by a frame of free pixels, so that the pixels around
  any point of the image can be looked up without bounds checks.
  """

  def __init__(self, setting: PathfinderSetting, num_images: int, rng: np.random.Generator):
    self.setting = setting
    self.rng = rng
    self.size = setting.resolution
    self.step = float(setting.paddle_length + setting.gap)
    zone = _dilate(_disk(setting.marker_radius), _block(-setting.margin, setting.margin))
    reach = setting.paddle_length + setting.gap + setting.thickness + setting.margin + 1
    self.pad = int(max(reach, np.abs(zone).max())) + 1
    self.width = self.size + 2 * self.pad
    self.patterns = _patterns(setting, self.width)
    self.zone_offsets = zone @ [self.width, 1]
    area = self.width * self.width
    self.row_base = np.arange(num_images) * area + self.pad * self.width + self.pad
    self.ink = np.zeros(num_images * area, dtype=np.uint8)
    # 0: free; otherwise path * 64 + segment + 1 of the path drawn there.
    self.owner = np.zeros(num_images * area, dtype=np.int16)

  def _anchor(self, rows, point: np.ndarray) -> np.ndarray:
    """Flat index of the pixel holding `point` `[rows, 2]`, moved into the image."""
    pixel = np.clip(np.floor(point).astype(np.int64), 0, self.size - 1)
    return self.row_base[rows] + pixel[:, 0] * self.width + pixel[:, 1]

  def _pattern(self, start: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Pattern index of segments from `start` `[n, 2]` heading `angle` `[n]`."""
    heading = np.rint(angle * (HEADINGS / (2 * np.pi))).astype(np.int64) % HEADINGS
    bins = np.minimum(((start - np.floor(start)) * SUBPIXELS).astype(np.int64), SUBPIXELS - 1)
    return (heading * SUBPIXELS + bins[:, 0]) * SUBPIXELS + bins[:, 1]

  def fits(self, rows, start, angle, path: int, segment: int, marks_end: bool = False):
    """Whether segments from `start` at `angle` stay inside and clear of other paths.

    With `marks_end`, the end of the dash must also leave room for a marker.
    """
    pattern = self._pattern(start, angle)
    corner = np.floor(start).astype(np.int64)
    extent = self.patterns.extent[pattern]
    low, high = self.setting.border, self.size - self.setting.border
    inside = ((corner[:, 0] + extent[:, 0] >= low) & (corner[:, 0] + extent[:, 1] < high) &
              (corner[:, 1] + extent[:, 2] >= low) & (corner[:, 1] + extent[:, 3] < high))
    owners = self.owner[self._anchor(rows, start)[:, None] + self.patterns.clear[pattern]]
    # Allowed: free pixels, and the path's own previous segment or later.
    lowest_allowed = path * 64 + segment + 1 - OWN_SEGMENTS_ALLOWED
    blocked = (owners != 0) & ((owners < lowest_allowed) | (owners >= (path + 1) * 64))
    fits = inside & ~blocked.any(axis=1)
    if marks_end:
      fits &= self.marker_fits(rows, self.dash_end(start, angle), path)
    return fits

  def draw_segment(self, rows, start, angle, path: int, segment: int) -> None:
    """Claims the solid segment for `path` and inks its dash."""
    pattern = self._pattern(start, angle)
    anchor = self._anchor(rows, start)[:, None]
    self.owner[anchor + self.patterns.solid[pattern]] = path * 64 + segment + 1
    self.ink[anchor + self.patterns.dash[pattern]] = INK

  def end_of(self, start, angle, length: float) -> np.ndarray:
    """The point `length` pixels from `start` along `angle`."""
    return start + length * np.stack([np.sin(angle), np.cos(angle)], -1)

  def dash_end(self, start, angle) -> np.ndarray:
    """The last inked point of a dash from `start` along `angle`."""
    return self.end_of(start, angle, self.setting.paddle_length - 1)

  def _choose(self, rows, starts, angles, path: int, segment: int, marks_end: bool):
    """Draws, in each row, the first of its candidate segments that fits.

    Args:
      rows: image of each row.
      starts: candidate starts `[rows, candidates, 2]`.
      angles: candidate headings `[rows, candidates]`.
      path: path id.
      segment: segment index within the path.
      marks_end: the segment ends the path and needs room for a marker.

    Returns:
      (drawn, start, angle): whether a row got a segment, and that segment.
    """
    count, candidates = angles.shape
    angles = np.rint(angles * (HEADINGS / (2 * np.pi))) * (2 * np.pi / HEADINGS)
    flat_fits = self.fits(np.repeat(rows, candidates), starts.reshape(-1, 2), angles.reshape(-1),
                          path, segment, marks_end)
    fits = flat_fits.reshape(count, candidates)
    drawn = fits.any(axis=1)
    first = np.argmax(fits, axis=1)
    start, angle = starts[np.arange(count), first], angles[np.arange(count), first]
    self.draw_segment(rows[drawn], start[drawn], angle[drawn], path, segment)
    return drawn, start, angle

  def _rounds(self, rows, propose, path: int, segment: int, marks_end: bool):
    """Tries candidate segments from `propose(pending, first, count)` in rounds until all fit."""
    drawn = np.zeros(len(rows), dtype=bool)
    start, angle = np.zeros((len(rows), 2)), np.zeros(len(rows))
    first = 0
    for count in TRIAL_ROUNDS:
      pending = np.flatnonzero(~drawn)
      if not len(pending):
        break
      starts, angles = propose(pending, first, count)
      done, start[pending], angle[pending] = self._choose(
          rows[pending], starts, angles, path, segment, marks_end)
      drawn[pending] = done
      first += count
    return drawn, start, angle

  def grow(self, rows, start, angle, path: int, segment: int, marks_end: bool = False):
    """Adds one segment to `path` in each of `rows`, turning a little, harder when blocked.

    Returns:
      (drawn, next_start, next_angle): which rows got a segment, and where the next
      segment of those rows starts and heads.
    """
    def propose(pending, first, count):
      # Later candidates may bend harder, up to MAX_BEND.
      limits = np.minimum(self.setting.max_turn * (1 + np.arange(first, first + count) / 2),
                          MAX_BEND)
      turns = self.rng.uniform(-1.0, 1.0, (len(pending), count)) * limits
      starts = np.repeat(start[pending, None, :], count, axis=1)
      return starts, angle[pending, None] + turns

    drawn, chosen_start, chosen_angle = self._rounds(rows, propose, path, segment, marks_end)
    return drawn, self.end_of(chosen_start, chosen_angle, self.step), chosen_angle

  def place(self, rows, path: int, near: np.ndarray | None = None):
    """Starts `path` in each of `rows`, at random or `seed_distance` from `near` `[rows, 2]`.

    Returns:
      (placed, origin, next_start, next_angle) for each row.
    """
    setting = self.setting

    def propose(pending, first, count):
      del first
      if near is None:
        low, high = setting.border, self.size - 1 - setting.border
        starts = self.rng.uniform(low, high, (len(pending), count, 2))
      else:
        bearing = self.rng.uniform(0, 2 * np.pi, (len(pending), count))
        offset = setting.seed_distance * np.stack([np.sin(bearing), np.cos(bearing)], -1)
        starts = near[pending, None, :] + offset
      return starts, self.rng.uniform(0, 2 * np.pi, (len(pending), count))

    placed, origin, angle = self._rounds(rows, propose, path, 0, False)
    return placed, origin, self.end_of(origin, angle, self.step), angle

  def marker_fits(self, rows, centre: np.ndarray, path: int) -> np.ndarray:
    """Whether a marker at `centre` is near no other path and no other marker's place.

    Keeping the two ends of a path apart matters: touching dots would give
    positives away, as negatives cannot have them.
    """
    zone = self._anchor(rows, np.rint(centre))[:, None] + self.zone_offsets
    owners = self.owner[zone]
    own_segment = ((owners - 1) // 64 == path) & ((owners - 1) % 64 != MAX_SEGMENTS - 1)
    return ((owners == 0) | own_segment).all(axis=1)

  def reserve_marker(self, rows, centre: np.ndarray, path: int) -> np.ndarray:
    """Keeps other paths away from a possible marker of `path`; False where one is there already."""
    clear = self.marker_fits(rows, centre, path)
    zone = self._anchor(rows, np.rint(centre))[:, None] + self.zone_offsets
    owners = self.owner[zone]
    self.owner[zone] = np.where(owners == 0, path * 64 + MAX_SEGMENTS, owners)
    return clear

  def crop(self, flat: np.ndarray, rows) -> np.ndarray:
    """The image part `[rows, size, size]` of a padded flat map."""
    maps = flat.reshape(-1, self.width, self.width)[rows]
    return maps[:, self.pad:self.pad + self.size, self.pad:self.pad + self.size]

  def solid_paths(self, rows) -> np.ndarray:
    """Pixels of the undashed paths of `rows`, bool `[rows, size, size]`."""
    owners = self.crop(self.owner, rows)
    reserved = (owners - 1) % 64 == MAX_SEGMENTS - 1
    return (owners > 0) & ~reserved


@functools.lru_cache(maxsize=8)
def _patterns(setting: PathfinderSetting, width: int) -> _Patterns:
  """Segment patterns of a setting, computed once."""
  return _Patterns(setting, width)


def _draw_targets(canvas: _Canvas, num_images: int):
  """Grows the two target paths, keeping room for markers at their ends.

  Returns:
    (ok, origins, terminals): which images hold both paths, and the start and the
    end of each path's dashes, `[2, images, 2]`.
  """
  last = canvas.setting.contour_length - 1
  ok = np.ones(num_images, dtype=bool)
  origins = np.zeros((2, num_images, 2))
  terminals = np.zeros((2, num_images, 2))
  heads = np.zeros((2, num_images, 2))
  headings = np.zeros((2, num_images))
  for index, path in enumerate(_TARGETS):
    rows = np.arange(num_images)
    near = None if index == 0 else origins[0]
    placed, origins[index], heads[index], headings[index] = canvas.place(rows, path, near)
    ok &= placed & canvas.reserve_marker(rows, origins[index], path)
  for segment in range(1, last + 1):
    for index, path in enumerate(_TARGETS):
      rows = np.flatnonzero(ok)
      start, angle = heads[index, rows], headings[index, rows]
      drawn, heads[index, rows], headings[index, rows] = canvas.grow(
          rows, start, angle, path, segment, marks_end=segment == last)
      ok[rows[~drawn]] = False
      if segment == last:
        rows = rows[drawn]
        terminals[index, rows] = canvas.dash_end(start[drawn], headings[index, rows])
        canvas.reserve_marker(rows, terminals[index, rows], path)
  return ok, origins, terminals


def _draw_distractors(canvas: _Canvas, rows: np.ndarray, first_path: int) -> None:
  """Adds distractor paths and single dashes to `rows`, each as long as it fits."""
  setting = canvas.setting
  lengths = [setting.distractor_length] * setting.num_distractors + [1] * setting.num_fragments
  for offset, length in enumerate(lengths):
    path = first_path + offset
    placed, _, head, heading = canvas.place(rows, path)
    live = rows[placed]
    head, heading = head[placed], heading[placed]
    for segment in range(1, length):
      drawn, head, heading = canvas.grow(live, head, heading, path, segment)
      live, head, heading = live[drawn], head[drawn], heading[drawn]


def _draw_unmarked(rng: np.random.Generator, setting: PathfinderSetting, num_images: int,
                   debug: bool) -> dict:
  """Draws paths in up to `num_images` images; those whose targets did not fit are left out.

  Returns:
    {'image': uint8 [n, size, size], 'origins', 'terminals': float [n, 2, 2] (the
    ends of both target paths)}, plus 'solid' with `debug`.
  """
  canvas = _Canvas(setting, num_images, rng)
  ok, origins, terminals = _draw_targets(canvas, num_images)
  rows = np.flatnonzero(ok)
  _draw_distractors(canvas, rows, first_path=len(_TARGETS) + 1)
  drawn = {'image': canvas.crop(canvas.ink, rows),
           'origins': origins[:, rows].transpose(1, 0, 2),
           'terminals': terminals[:, rows].transpose(1, 0, 2)}
  if debug:
    drawn['solid'] = canvas.solid_paths(rows)
  return drawn


def _stamp(images: np.ndarray, centres: np.ndarray, radius: float, value) -> None:
  """Sets a disc of `radius` around each of `centres` `[n, 2]` in `images` `[n, h, w]`."""
  disk = _disk(radius)
  pixels = np.rint(centres).astype(np.int64)[:, None, :] + disk[None]
  pixels = np.clip(pixels, 0, np.array(images.shape[1:]) - 1)
  rows = np.arange(len(images))[:, None]
  images[rows, pixels[..., 0], pixels[..., 1]] = value


def _draw_chunk(setting: PathfinderSetting, words: tuple[int, ...], index: int,
                debug: bool) -> dict:
  """The unmarked images of chunk `index`: one batch of attempts from its own random stream."""
  rng = np.random.default_rng(words + (index, 0))
  return _draw_unmarked(rng, setting, IMAGES_PER_DRAW[setting.resolution], debug)


def _mark_chunk(drawn: dict, setting: PathfinderSetting, words: tuple[int, ...], index: int,
                debug: bool) -> dict:
  """Chunk `index` with exactly balanced labels and the two dots of each image."""
  rng = np.random.default_rng(words + (index, 1))
  count = len(drawn['image'])
  labels = rng.permutation(np.arange(count) % 2)
  # A positive marks both ends of one target, a negative one end of each.
  marked = rng.integers(0, 2, count)
  other = np.where(labels == 1, marked, 1 - marked)
  rows = np.arange(count)
  markers = np.stack([drawn['origins'][rows, marked], drawn['terminals'][rows, other]], 1)
  chunk = {'image': drawn['image'], 'label': labels}
  for end in range(2):
    _stamp(chunk['image'], markers[:, end], setting.marker_radius, INK)
  if debug:
    chunk['solid'] = drawn['solid']
    for end in range(2):
      _stamp(chunk['solid'], markers[:, end], setting.marker_radius, True)
    chunk['markers'] = np.rint(markers).astype(np.int64)
  return chunk


def _drawings(setting: PathfinderSetting, words: tuple[int, ...], debug: bool, workers: int):
  """Yields the unmarked chunks 0, 1, 2, ... in order, drawn in `workers` processes."""
  if workers <= 1:
    for index in itertools.count():
      yield _draw_chunk(setting, words, index, debug)
  # Fresh processes: forking one that runs JAX threads can deadlock.
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    ahead = collections.deque()
    try:
      for index in itertools.count():
        ahead.append(pool.submit(_draw_chunk, setting, words, index, debug))
        if len(ahead) > workers:
          yield ahead.popleft().result()
    finally:
      for future in ahead:
        future.cancel()


def _seed_words(seed) -> tuple[int, ...]:
  """A seed given as an int or a sequence of ints, as a tuple."""
  return tuple(int(word) for word in np.atleast_1d(seed))


def generate_chunks(num_examples: int, setting: PathfinderSetting, seed=None,
                    debug: bool = False, workers: int = 1) -> Iterator[dict]:
  """Yields `generate`'s images chunk by chunk, so that large data sets need little memory."""
  if setting.contour_length > MAX_SEGMENTS or setting.distractor_length > MAX_SEGMENTS:
    raise ValueError(f'paths are limited to {MAX_SEGMENTS} segments')
  if setting.contour_length < 2:
    raise ValueError('target paths need at least 2 segments')
  words = _seed_words(setting.seed if seed is None else seed)
  total = 0
  drawings = _drawings(setting, words, debug, workers)
  try:
    for index in itertools.count():
      if total >= num_examples:
        return
      drawn = {key: value[:num_examples - total] for key, value in next(drawings).items()}
      total += len(drawn['image'])
      yield _mark_chunk(drawn, setting, words, index, debug)
  finally:
    drawings.close()


def generate(num_examples: int, setting: PathfinderSetting = SETTINGS['res32_hard'],
             seed=None, debug: bool = False, workers: int = 1,
             progress: Callable[[int], None] | None = None) -> dict:
  """Generates Pathfinder images.

  Images come in chunks, each drawn from its own random stream, so the result
  depends on the seed and `num_examples` only, not on `workers`.

  Args:
    num_examples: how many images.
    setting: drawing parameters.
    seed: int or sequence of ints; `setting.seed` when None.
    debug: also return 'solid' (bool `[n, size, size]`: the paths drawn without gaps
      and the marker discs) and 'markers' (`[n, 2, 2]`: row and column of both dots),
      to check connectivity.
    workers: processes drawing chunks in parallel.
    progress: called with the number of new images after each chunk.

  Returns:
    {'image': uint8 [n, size, size], 'label': int64 [n]} (plus the debug arrays).
  """
  chunks = []
  for chunk in generate_chunks(num_examples, setting, seed, debug, workers):
    chunks.append(chunk)
    if progress is not None:
      progress(len(chunk['label']))
  return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def split_seed(setting: PathfinderSetting, split: str) -> tuple[int, int]:
  """The seed of a split's random streams."""
  common.check_choice('split', split, SPLITS)
  return (setting.seed, SPLITS.index(split))


# --- Official LRA release files -------------------------------------------------------------

LRA_DIFFICULTY_FOLDERS = {
    'easy': 'curv_baseline',
    'intermediate': 'curv_contour_length_9',
    'hard': 'curv_contour_length_14',
}
LRA_SPLIT_FRACTIONS = {'train': (0.0, 0.8), 'valid': (0.8, 0.9), 'test': (0.9, 1.0)}


def find_lra_release(data_dir, resolution: int, difficulty: str) -> pathlib.Path:
  """The folder of official LRA Pathfinder files, e.g. .../pathfinder32/curv_contour_length_14."""
  common.check_choice('resolution', resolution, RESOLUTIONS)
  common.check_choice('difficulty for the LRA files', difficulty, tuple(LRA_DIFFICULTY_FOLDERS))
  tail = f'pathfinder{resolution}/{LRA_DIFFICULTY_FOLDERS[difficulty]}'
  return common.find_data(
      data_dir, [f'lra_release/{tail}', f'lra_release/lra_release/{tail}', tail],
      what=f'LRA Pathfinder-{resolution} ({difficulty})',
      expected=f'the folder {tail} holding metadata/*.npy and imgs/*/sample_*.png',
      download=f'{common.LRA_RELEASE_URL} (extract it there)',
      hint='Extract the archive there so that lra_release/ is directly inside the data folder. '
           'Or generate the data instead (source="generated").')


def read_lra_metadata(folder: pathlib.Path) -> tuple[list[pathlib.Path], np.ndarray]:
  """Image paths and labels listed in the metadata files of an LRA Pathfinder folder.

  Each line of metadata/<n>.npy (text despite the name) reads
  `imgs/<n> sample_<i>.png <i> <label> ...`.
  """
  metadata_files = sorted((folder / 'metadata').glob('*.npy'),
                          key=lambda p: (len(p.stem), p.stem))
  if not metadata_files:
    raise common.CorruptDataError(f'{folder / "metadata"} holds no *.npy metadata files')
  paths, labels = [], []
  for metadata in metadata_files:
    for number, line in enumerate(metadata.read_text().splitlines(), 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) < 4 or fields[3] not in ('0', '1'):
        raise common.CorruptDataError(
            f'{metadata}, line {number}: expected "<dir> <file> <index> <0|1> ...", got {line!r}')
      paths.append(folder / fields[0] / fields[1])
      labels.append(int(fields[3]))
  return paths, np.asarray(labels, dtype=np.int32)


def _check_images(paths: list[pathlib.Path], skip_bad: bool):
  """Indices of the image files that exist and are not empty; error on others unless skipped."""
  sizes = {}
  for folder in {p.parent for p in paths}:
    if folder.is_dir():
      sizes.update({folder / entry.name: entry.stat().st_size for entry in _scan(folder)})
  good = np.array([sizes.get(p, 0) > 0 for p in paths], dtype=bool)
  if not good.all():
    bad = [str(paths[i]) for i in np.flatnonzero(~good)[:5]]
    message = f'{int((~good).sum())} listed images are missing or empty, e.g. {bad}'
    if not skip_bad:
      raise common.CorruptDataError(message + '; pass skip_bad_images=True to leave them out')
    logging.warning('%s; leaving them out', message)
  return np.flatnonzero(good)


def _scan(folder: pathlib.Path):
  """Directory entries of `folder`."""
  import os  # pylint: disable=g-import-not-at-top
  with os.scandir(folder) as entries:
    return list(entries)


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


def lra_release_source(split: str, data_dir, resolution: int, difficulty: str,
                       skip_bad_images: bool = False) -> LraPathfinderSource:
  """A split of the official files: 80/10/10 of the listed images in metadata order, as LRA."""
  folder = find_lra_release(data_dir, resolution, difficulty)
  paths, labels = read_lra_metadata(folder)
  good = _check_images(paths, skip_bad_images)
  low, high = LRA_SPLIT_FRACTIONS[split]
  chosen = good[int(low * len(good)):int(high * len(good))]
  return LraPathfinderSource([paths[i] for i in chosen], labels[chosen], resolution)


def _to_example(record: dict) -> dict:
  """Model example of a stored record."""
  return {'inputs': common.pixels_to_tokens(record['image']),
          'targets': np.int32(record['label'])}


def load(split: str, data_dir=None, seq_len: int | None = None, resolution: int = 32,
         difficulty: str = 'hard', source: str = 'generated', config: str | None = None,
         prepare_if_missing: bool = False, skip_bad_images: bool = False) -> common.Task:
  """A Pathfinder split as pixel sequences.

  Args:
    split: 'train', 'valid' or 'test'.
    data_dir: data folder; defaults searched when None.
    seq_len: must be resolution**2 (or None).
    resolution: 32, 64, 128 (Path-X) or 256.
    difficulty: 'easy', 'intermediate', 'hard' or 'extreme' (generated only).
    source: 'generated' (prepared here) or 'lra_release' (official files).
    config: generated config name overriding resolution and difficulty (e.g. 'tiny').
    prepare_if_missing: generate the data when it is not prepared yet.
    skip_bad_images: leave out (with a warning) official images that are missing or empty.

  Returns:
    The Task; examples are {'inputs': int32 [resolution**2], 'targets': int32}.
  """
  common.check_choice('split', split, SPLITS)
  common.check_choice('source', source, ('generated', 'lra_release'))
  if config is not None:
    common.check_choice('config', config, tuple(SETTINGS))
    resolution = SETTINGS[config].resolution
  common.check_choice('resolution', resolution, RESOLUTIONS)
  length = resolution * resolution
  if seq_len not in (None, length):
    raise ValueError(f'Pathfinder-{resolution} sequences have length {length}, not {seq_len}')
  if source == 'lra_release':
    examples = lra_release_source(split, data_dir, resolution, difficulty, skip_bad_images)
  else:
    from efficient_attn.data import generated  # pylint: disable=g-import-not-at-top
    config = config or config_name(resolution, difficulty)
    common.check_choice('pathfinder config', config, tuple(SETTINGS))
    records = generated.load_split('pathfinder', config, split, data_dir, prepare_if_missing)
    examples = common.MappedSource(records, _to_example)
  name = 'pathx' if resolution == 128 else 'pathfinder'
  return common.Task(name=name, split=split, source=examples, vocab_size=common.BYTE_VOCAB_SIZE,
                     num_classes=NUM_CLASSES, seq_len=length)
