"""The Pathfinder image generator: dashed paths, distractors and two dots, many images at a time.

It follows the generator of Linsley et al. (2018), github.com/drewlinsley/pathfinder
(snakes2.py), with which LRA's images were drawn. Both classes draw two long target
paths whose starts lie `seed_distance` apart, the first at least twice that far
from the edges (as LRA): a positive image marks both ends of one of them, a
negative one marks the start of one and the far end of the other, so the distance
between the dots says little (a best threshold on it: 51.5% on 32 px hard).
Shorter distractor paths and single dashes fill the rest. Paths keep `margin` free
pixels between each other, so connectivity is exactly the label.

Choices, with LRA's as the defaults:
- ink: 'grey' draws antialiased lines `line_width` pixels wide (LRA's
  paddle_thickness) at `contrast` times the dots' brightness, and antialiased
  dots; coverage comes from 4x4 samples per pixel, where LRA drew at twice the
  size and shrank with a Lanczos filter. 'binary' inks whole pixels at 255 with
  lines `thickness` pixels wide.
- turns: each segment turns from the last by an angle of density
  cos^2(continuity * angle) within +-90/continuity degrees, LRA's `continuity`
  (1.0 at 32 px: std about 0.57 rad), among the turns that fit, as LRA samples the
  free places: 20 random turns are tried, then all headings weighted by that density.
- dots: as in LRA, a dot at the end of a path near the border may be cut by it
  (paths keep `border` pixels from the edge, a dot is `marker_radius` wide): 7% of
  32 px hard images have a dot centre within 1 pixel of the border.

Segment pixels come from precomputed patterns for 64 headings and 4x4 sub-pixel
starts (pixel (i, j) spans [i, i + 1) x [j, j + 1)); drawing uses numpy only.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import multiprocessing
from typing import Callable, Iterator

import numpy as np

INK = 255
INKS = ('grey', 'binary')
# Attempts per chunk, headings, sub-pixel bins and candidate rounds are part of what
# a seed means: changing them changes the images.
IMAGES_PER_DRAW = {32: 4096, 64: 1024, 128: 256, 256: 64}
HEADINGS = 64
SUBPIXELS = 4
# Samples per pixel side when computing the coverage of grey ink.
COVERAGE_SAMPLES = 4
# Random candidate segments tried per round, in order, until one fits; a last round
# then tries every heading (growing a path) or as many starts again (placing one).
TRIAL_ROUNDS = (1, 4, 15)
# A segment may touch its own path's previous segment, never older ones.
OWN_SEGMENTS_ALLOWED = 1
# Owner map codes: 0 is free; segment s of path p is p * CODES_PER_PATH + s + 1, and
# the room kept for p's possible markers uses the slot MARKER_SLOT in place of s, so
# that path p owns the codes p * CODES_PER_PATH + 1 ... p * CODES_PER_PATH + MARKER_SLOT + 1.
CODES_PER_PATH = 64
MARKER_SLOT = CODES_PER_PATH - 2
MAX_SEGMENTS = MARKER_SLOT
_TARGETS = (1, 2)


@dataclasses.dataclass(frozen=True)
class PathfinderSetting:
  """Drawing parameters, split sizes and seed of a Pathfinder data set (lengths in pixels).

  The defaults are LRA's Pathfinder-32 (hard). `ink` is 'grey' (antialiased lines
  `line_width` wide at `contrast` times the dots' brightness, clipped) or 'binary'
  (lines `thickness` pixels wide); `continuity` shapes the turns (see the module
  docstring); `border` is the margin kept free along the edges.
  """
  resolution: int = 32
  contour_length: int = 14
  paddle_length: int = 2
  gap: int = 1
  ink: str = 'grey'
  line_width: float = 0.5
  contrast: float = 1.5
  thickness: int = 1
  margin: int = 1
  marker_radius: float = 1.5
  seed_distance: float = 7.0
  num_distractors: int = 5
  distractor_length: int = 4
  num_fragments: int = 4
  continuity: float = 1.0
  border: int = 1
  num_train: int = 160_000
  num_valid: int = 20_000
  num_test: int = 20_000
  seed: int = 0

  def split_sizes(self) -> dict[str, int]:
    """Number of examples of each split."""
    return {'train': self.num_train, 'valid': self.num_valid, 'test': self.num_test}


def _code(path: int, slot) -> int:
  """Owner code of `path`'s segment `slot` (or MARKER_SLOT)."""
  return path * CODES_PER_PATH + slot + 1


def _path_of(codes: np.ndarray) -> np.ndarray:
  """The path of nonzero owner codes."""
  return (codes - 1) // CODES_PER_PATH


def _slot_of(codes: np.ndarray) -> np.ndarray:
  """The segment slot of nonzero owner codes."""
  return (codes - 1) % CODES_PER_PATH


def _block(low: int, high: int) -> np.ndarray:
  """Offsets (dy, dx) of the square block [low, high]^2, `[count, 2]`."""
  span = np.arange(low, high + 1)
  return np.stack(np.meshgrid(span, span, indexing='ij'), -1).reshape(-1, 2)


def _disk(radius: float) -> np.ndarray:
  """Offsets (dy, dx) within `radius` of the origin, `[count, 2]`."""
  square = _block(-int(radius), int(radius))
  return square[(square ** 2).sum(1) <= radius ** 2]


def _dilate(offsets: np.ndarray, by: np.ndarray) -> np.ndarray:
  """Distinct sums of an offset from `offsets` and one from `by`, sorted."""
  sums = (offsets[:, None, :] + by[None, :, :]).reshape(-1, 2)
  # One number per offset: np.unique on rows (axis=0) is much slower.
  span = int(np.abs(sums).max())
  base = 2 * span + 1
  codes = np.unique((sums[:, 0] + span) * base + sums[:, 1] + span)
  return np.stack([codes // base - span, codes % base - span], -1)


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
  """Stacks 1-D arrays, repeating each one's first entry up to the longest length."""
  width = max(len(r) for r in rows)
  return np.stack([np.concatenate([r, np.full(width - len(r), r[0])]) for r in rows])


def _coverage(start: np.ndarray, direction: np.ndarray, length: float,
              radius: float) -> tuple[np.ndarray, np.ndarray]:
  """The pixels a stroke covers, and the fraction of each it covers.

  The stroke holds the points within `radius` of the segment from `start` along
  `direction` for `length`, in pixel units (pixel (i, j) spans [i, i + 1) x [j, j + 1)).

  Returns:
    (offsets `[count, 2]`, coverage in (0, 1] `[count]`).
  """
  end = start + length * direction
  low = np.floor(np.minimum(start, end) - radius).astype(np.int64)
  high = np.floor(np.maximum(start, end) + radius).astype(np.int64)
  rows, columns = np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1)
  pixels = np.stack(np.meshgrid(rows, columns, indexing='ij'), -1).reshape(-1, 2)
  sub = (np.arange(COVERAGE_SAMPLES) + 0.5) / COVERAGE_SAMPLES
  sub = np.stack(np.meshgrid(sub, sub, indexing='ij'), -1).reshape(-1, 2)
  points = (pixels[:, None, :] + sub[None]) - start
  along = np.clip(points @ direction, 0.0, length)
  distance = np.linalg.norm(points - along[..., None] * direction, axis=-1)
  covered = (distance <= radius).mean(axis=1)
  return pixels[covered > 0], covered[covered > 0]


def _dot(setting: PathfinderSetting) -> tuple[np.ndarray, np.ndarray]:
  """Pixel offsets of a marker dot around its centre pixel, and their ink values."""
  if setting.ink == 'binary':
    disk = _disk(setting.marker_radius)
    return disk, np.full(len(disk), INK, dtype=np.uint8)
  offsets, covered = _coverage(np.full(2, 0.5), np.array([0.0, 1.0]), 0.0,
                               setting.marker_radius)
  return offsets, np.rint(covered * INK).astype(np.uint8)


class _Patterns:
  """The pixels of a segment for each quantised heading and sub-pixel start.

  Pattern `(heading * SUBPIXELS + y_bin) * SUBPIXELS + x_bin` lists flat offsets, in a
  canvas `width` pixels wide, from the pixel holding the segment's start: `solid`
  (the segment without its gap), `clear` (solid grown by the margin: no other path
  may be there) and `dash` (the inked part, of ink values `dash_ink`). `extent` is
  its solid's (min dy, max dy, min dx, max dx).
  """

  def __init__(self, setting: PathfinderSetting, width: int):
    step = setting.paddle_length + setting.gap
    clear_block = _block(-setting.margin, setting.margin)
    solid, zone, dash, dash_ink, extent = [], [], [], [], []
    for heading in range(HEADINGS):
      angle = 2 * np.pi * heading / HEADINGS
      direction = np.array([np.sin(angle), np.cos(angle)])
      for y_bin in range(SUBPIXELS):
        for x_bin in range(SUBPIXELS):
          start = (np.array([y_bin, x_bin]) + 0.5) / SUBPIXELS
          pixels, dash_pixels, ink = self._stroke(setting, start, direction, step)
          extent.append([pixels[:, 0].min(), pixels[:, 0].max(),
                         pixels[:, 1].min(), pixels[:, 1].max()])
          solid.append(pixels @ [width, 1])
          zone.append(_dilate(pixels, clear_block) @ [width, 1])
          dash.append(dash_pixels @ [width, 1])
          dash_ink.append(ink)
    self.solid, self.clear, self.dash = _pad_rows(solid), _pad_rows(zone), _pad_rows(dash)
    self.dash_ink = _pad_rows(dash_ink)
    self.extent = np.array(extent)

  @staticmethod
  def _stroke(setting: PathfinderSetting, start, direction, step: int):
    """(solid pixels, dash pixels, dash ink values) of one segment."""
    if setting.ink == 'binary':
      low, high = -((setting.thickness - 1) // 2), setting.thickness // 2
      line = _block(low, high)
      solid_t = np.arange(0.0, step + 0.25, 0.5)
      centres = np.floor(start + solid_t[:, None] * direction).astype(np.int64)
      dash_t = np.arange(0.0, setting.paddle_length - 1 + 0.25, 0.5)
      dash_centres = np.floor(start + dash_t[:, None] * direction).astype(np.int64)
      dash = _dilate(dash_centres, line)
      return _dilate(centres, line), dash, np.full(len(dash), INK, dtype=np.uint8)
    dash, covered = _coverage(start, direction, setting.paddle_length, setting.line_width / 2)
    ink = np.rint(np.minimum(covered * setting.contrast, 1.0) * INK).astype(np.uint8)
    # At least a pixel wide, the solid stays 8-connected; it holds every inked pixel.
    solid, _ = _coverage(start, direction, step, max(setting.line_width, 1.0) / 2)
    return solid, dash, ink


@functools.lru_cache(maxsize=8)
def _patterns(setting: PathfinderSetting, width: int) -> _Patterns:
  """Segment patterns of a setting, computed once."""
  return _Patterns(setting, width)


def _turn_table(points: int = 1025) -> tuple[np.ndarray, np.ndarray]:
  """(cumulative probability, angle) of the density cos^2(u) on [-pi/2, pi/2]."""
  u = np.linspace(-np.pi / 2, np.pi / 2, points)
  return (u + np.pi / 2 + np.sin(2 * u) / 2) / np.pi, u


_TURN_CDF, _TURN_ANGLES = _turn_table()


def sample_turns(rng: np.random.Generator, continuity: float, shape) -> np.ndarray:
  """Turns (radians) of density cos^2(continuity * turn) within +-pi / (2 continuity)."""
  return np.interp(rng.random(shape), _TURN_CDF, _TURN_ANGLES) / continuity


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
    dot, _ = _dot(setting)
    zone = _dilate(dot, _block(-setting.margin, setting.margin))
    reach = (setting.paddle_length + setting.gap + setting.thickness + setting.margin
             + int(np.ceil(setting.line_width)) + 1)
    self.pad = int(max(reach, np.abs(zone).max())) + 1
    self.width = self.size + 2 * self.pad
    self.patterns = _patterns(setting, self.width)
    self.zone_offsets = zone @ [self.width, 1]
    area = self.width * self.width
    self.row_base = np.arange(num_images) * area + self.pad * self.width + self.pad
    self.ink = np.zeros(num_images * area, dtype=np.uint8)
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
    # Allowed: free pixels, the path's own previous segment or later, its marker room.
    lowest = _code(path, segment - OWN_SEGMENTS_ALLOWED)
    blocked = (owners != 0) & ((owners < lowest) | (owners > _code(path, MARKER_SLOT)))
    fits = inside & ~blocked.any(axis=1)
    if marks_end:
      fits &= self.marker_fits(rows, self.dash_end(start, angle), path)
    return fits

  def draw_segment(self, rows, start, angle, path: int, segment: int) -> None:
    """Claims the solid segment for `path` and inks its dash."""
    pattern = self._pattern(start, angle)
    anchor = self._anchor(rows, start)[:, None]
    self.owner[anchor + self.patterns.solid[pattern]] = _code(path, segment)
    dash = anchor + self.patterns.dash[pattern]
    self.ink[dash] = np.maximum(self.ink[dash], self.patterns.dash_ink[pattern])

  def end_of(self, start, angle, length: float) -> np.ndarray:
    """The point `length` pixels from `start` along `angle`."""
    return start + length * np.stack([np.sin(angle), np.cos(angle)], -1)

  def dash_end(self, start, angle) -> np.ndarray:
    """The last inked point of a dash from `start` along `angle`."""
    return self.end_of(start, angle, self.setting.paddle_length - 1)

  def _choose(self, rows, starts, angles, path: int, segment: int, marks_end: bool,
              weights: np.ndarray | None = None):
    """Draws, in each row, one of its candidate segments that fit.

    Args:
      rows: image of each row.
      starts: candidate starts `[rows, candidates, 2]`.
      angles: candidate headings `[rows, candidates]`.
      path: path id.
      segment: segment index within the path.
      marks_end: the segment ends the path and needs room for a marker.
      weights: `[candidates]`; when given, the candidate is drawn among those that fit
        with these weights, else it is the first that fits.

    Returns:
      (drawn, start, angle): whether a row got a segment, and that segment.
    """
    count, candidates = angles.shape
    angles = np.rint(angles * (HEADINGS / (2 * np.pi))) * (2 * np.pi / HEADINGS)
    flat_fits = self.fits(np.repeat(rows, candidates), starts.reshape(-1, 2), angles.reshape(-1),
                          path, segment, marks_end)
    fits = flat_fits.reshape(count, candidates)
    drawn = fits.any(axis=1)
    if weights is None:
      first = np.argmax(fits, axis=1)
    else:
      mass = np.cumsum(fits * weights, axis=1)
      first = np.argmax(mass > self.rng.random((count, 1)) * mass[:, -1:], axis=1)
    start, angle = starts[np.arange(count), first], angles[np.arange(count), first]
    self.draw_segment(rows[drawn], start[drawn], angle[drawn], path, segment)
    return drawn, start, angle

  def _rounds(self, rows, propose, path: int, segment: int, marks_end: bool):
    """Tries candidate segments from `propose(pending, count)` in rounds until all fit.

    In a last round `propose(pending, None)` may give all candidates with weights,
    to draw among all that fit.
    """
    drawn = np.zeros(len(rows), dtype=bool)
    start, angle = np.zeros((len(rows), 2)), np.zeros(len(rows))
    for count in TRIAL_ROUNDS + (None,):
      pending = np.flatnonzero(~drawn)
      if not len(pending):
        break
      starts, angles, weights = propose(pending, count)
      done, start[pending], angle[pending] = self._choose(
          rows[pending], starts, angles, path, segment, marks_end, weights)
      drawn[pending] = done
    return drawn, start, angle

  def grow(self, rows, start, angle, path: int, segment: int, marks_end: bool = False):
    """Adds one segment to `path` in each of `rows`, turning as LRA's `continuity` says.

    The turn is drawn with density cos^2(continuity * turn) among the turns that
    fit: first by trying random turns, then, for the rows where none fitted, among
    all headings within +-90/continuity degrees, weighted by that density.

    Returns:
      (drawn, next_start, next_angle): which rows got a segment, and where the next
      segment of those rows starts and heads.
    """
    continuity = self.setting.continuity

    def propose(pending, count):
      if count is None:
        turns = np.arange(-HEADINGS // 4, HEADINGS // 4 + 1) * (2 * np.pi / HEADINGS)
        weights = np.cos(np.minimum(np.abs(turns) * continuity, np.pi / 2)) ** 2
        turns = np.broadcast_to(turns, (len(pending), len(turns)))
      else:
        turns, weights = sample_turns(self.rng, continuity, (len(pending), count)), None
      starts = np.repeat(start[pending, None, :], turns.shape[1], axis=1)
      return starts, angle[pending, None] + turns, weights

    drawn, chosen_start, chosen_angle = self._rounds(rows, propose, path, segment, marks_end)
    return drawn, self.end_of(chosen_start, chosen_angle, self.step), chosen_angle

  def place(self, rows, path: int, near: np.ndarray | None = None, inset: float | None = None):
    """Starts `path` in each of `rows`, at random or `seed_distance` from `near` `[rows, 2]`.

    Random starts keep `inset` pixels (`border` when None) from the edges.

    Returns:
      (placed, origin, next_start, next_angle) for each row.
    """
    setting = self.setting
    inset = setting.border if inset is None else inset

    def propose(pending, count):
      count = count or TRIAL_ROUNDS[-1]
      if near is None:
        starts = self.rng.uniform(inset, self.size - inset, (len(pending), count, 2))
      else:
        bearing = self.rng.uniform(0, 2 * np.pi, (len(pending), count))
        offset = setting.seed_distance * np.stack([np.sin(bearing), np.cos(bearing)], -1)
        starts = near[pending, None, :] + offset
      return starts, self.rng.uniform(0, 2 * np.pi, (len(pending), count)), None

    placed, origin, angle = self._rounds(rows, propose, path, 0, False)
    return placed, origin, self.end_of(origin, angle, self.step), angle

  def marker_fits(self, rows, centre: np.ndarray, path: int) -> np.ndarray:
    """Whether a marker at `centre` is near no other path and no other marker's place.

    Keeping the two ends of a path apart matters: touching dots would give
    positives away, as negatives cannot have them.
    """
    zone = self._anchor(rows, centre)[:, None] + self.zone_offsets
    owners = self.owner[zone]
    own_segment = (_path_of(owners) == path) & (_slot_of(owners) != MARKER_SLOT)
    return ((owners == 0) | own_segment).all(axis=1)

  def reserve_marker(self, rows, centre: np.ndarray, path: int) -> np.ndarray:
    """Keeps other paths away from a possible marker of `path`; False where one is there already."""
    clear = self.marker_fits(rows, centre, path)
    zone = self._anchor(rows, centre)[:, None] + self.zone_offsets
    owners = self.owner[zone]
    self.owner[zone] = np.where(owners == 0, _code(path, MARKER_SLOT), owners)
    return clear

  def crop(self, flat: np.ndarray, rows) -> np.ndarray:
    """The image part `[rows, size, size]` of a padded flat map."""
    maps = flat.reshape(-1, self.width, self.width)[rows]
    return maps[:, self.pad:self.pad + self.size, self.pad:self.pad + self.size]

  def solid_paths(self, rows) -> np.ndarray:
    """Pixels of the undashed paths of `rows`, bool `[rows, size, size]`."""
    owners = self.crop(self.owner, rows)
    return (owners > 0) & (_slot_of(owners) != MARKER_SLOT)


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
  # As LRA, the first target starts at least twice seed_distance from the edges.
  inset = min(2 * canvas.setting.seed_distance, canvas.size / 2 - 1)
  for index, path in enumerate(_TARGETS):
    rows = np.arange(num_images)
    near = None if index == 0 else origins[0]
    placed, origins[index], heads[index], headings[index] = canvas.place(rows, path, near, inset)
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


def _stamp(images: np.ndarray, centres: np.ndarray, offsets: np.ndarray, values) -> None:
  """Inks `values` at `offsets` around each of `centres` `[n, 2]` in `images` `[n, h, w]`.

  Pixels outside an image are left out: a dot near the border is cut by it.
  """
  pixels = np.floor(centres).astype(np.int64)[:, None, :] + offsets[None]
  size = np.array(images.shape[1:])
  inside = ((pixels >= 0) & (pixels < size)).all(-1)
  pixels = np.clip(pixels, 0, size - 1)
  rows = np.arange(len(images))[:, None]
  current = images[rows, pixels[..., 0], pixels[..., 1]]
  images[rows, pixels[..., 0], pixels[..., 1]] = np.where(
      inside, np.maximum(current, values), current)


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
  dot, ink = _dot(setting)
  for end in range(2):
    _stamp(chunk['image'], markers[:, end], dot, ink)
  if debug:
    chunk['solid'] = drawn['solid']
    for end in range(2):
      _stamp(chunk['solid'], markers[:, end], dot, True)
    chunk['markers'] = np.floor(markers).astype(np.int64)
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


def check_setting(setting: PathfinderSetting) -> None:
  """Raises ValueError on a setting the generator cannot draw."""
  if setting.ink not in INKS:
    raise ValueError(f'ink={setting.ink!r} does not exist; available: '
                     f'{", ".join(map(repr, INKS))}')
  if setting.contour_length > MAX_SEGMENTS or setting.distractor_length > MAX_SEGMENTS:
    raise ValueError(f'paths are limited to {MAX_SEGMENTS} segments')
  if setting.contour_length < 2:
    raise ValueError('target paths need at least 2 segments')
  if setting.continuity < 1.0:
    raise ValueError(f'continuity={setting.continuity} would allow turns beyond 90 degrees; '
                     'use 1.0 or more')


def generate_chunks(num_examples: int, setting: PathfinderSetting, seed=None,
                    debug: bool = False, workers: int = 1) -> Iterator[dict]:
  """Yields `generate`'s images chunk by chunk, so that large data sets need little memory."""
  check_setting(setting)
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


def generate(num_examples: int, setting: PathfinderSetting = PathfinderSetting(),
             seed=None, debug: bool = False, workers: int = 1,
             progress: Callable[[int], None] | None = None) -> dict:
  """Generates Pathfinder images.

  Images come in chunks, each drawn from its own random stream, so the result
  depends on the seed and `num_examples` only, not on `workers`.

  Args:
    num_examples: how many images.
    setting: drawing parameters (LRA's Pathfinder-32 hard by default).
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
