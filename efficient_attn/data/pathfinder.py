"""Pathfinder (Linsley et al. 2018) as in Long Range Arena: generated here, or read from LRA files.

An image shows two marker dots and several curved dashed paths; the label says
whether one path joins the dots. Resolutions 32, 64, 128 (Path-X) and 256;
difficulty is the number of segments of the target paths: easy 6, intermediate 9,
hard 14 (LRA's setting), extreme 20. Images are 8-bit grayscale, flattened row by
row to a pixel sequence of ids value + 1 (so 0 stays padding), 257 ids, 2 classes.

Generated data (`source='generated'`, pathfinder_draw.py) follows LRA's generator
settings per resolution (lra_benchmarks/data/pathfinder.py): dash length, line
width, contrast, margin, dot radius, distance between the target starts,
continuity (1.0 at 32 px, 1.8 above) and distractors of a third of the target
length, as many as LRA's integer division of a segment budget gives (5 at 32 and
64 px, 8 at 128, 7 at 256 for hard). Ink is antialiased grey as in LRA's images;
`ink='binary'` draws whole pixels instead. Labels are balanced and a seed fixes
every image. Configs `res<R>_<difficulty>` hold 160K/20K/20K train/valid/test
images (LRA's 80/10/10 proportions); 'tiny' is for tests. This project's own
values: dash length and gap above 32 px and the distance between the target
starts at 256 px (LRA's docstring gives none), margin 2 at 128 px (LRA 2 or 3 per
image), and a few single dashes per image (LRA's snakes2_wrapper.py draws none).
Binary-ink configs are named `res<R>_<difficulty>_binary` (`load(..., ink='binary')`).

Prepare the generated data once:
  python -m efficient_attn.data.prepare pathfinder --resolution 32 --difficulty hard

Users with the official files (lra_release.gz from the LRA repository, folders
pathfinder32/ ... pathfinder256/ with curv_baseline, curv_contour_length_9 and
curv_contour_length_14) read them with `source='lra_release'` (pathfinder_lra.py),
split as LRA split them.
"""

import dataclasses

import numpy as np

from efficient_attn.data import common
from efficient_attn.data import pathfinder_lra
from efficient_attn.data.pathfinder_draw import INKS, PathfinderSetting
# The generator, re-exported for the TFDS builder and prepare.py.
from efficient_attn.data.pathfinder_draw import generate, generate_chunks  # pylint: disable=unused-import

RESOLUTIONS = (32, 64, 128, 256)
PATHX_RESOLUTION = 128
DIFFICULTIES = {'easy': 6, 'intermediate': 9, 'hard': 14, 'extreme': 20}
NUM_CLASSES = 2


@dataclasses.dataclass(frozen=True)
class _Style:
  """LRA's drawing parameters of one resolution (this project's where LRA has none)."""
  paddle_length: int
  gap: int
  line_width: float  # LRA's paddle_thickness
  contrast: float  # LRA's snake contrast times paddle contrast
  thickness: int  # binary ink only
  margin: int
  marker_radius: float
  seed_distance: float
  continuity: float
  distractor_budget: int  # LRA's distractor segments: num_distractor_snakes * length
  num_fragments: int


_STYLES = {
    32: _Style(2, 1, 0.5, 1.5, 1, 1, 1.5, 7.0, 1.0, 20, 4),
    64: _Style(4, 2, 1.0, 0.8, 1, 1, 2.5, 12.0, 1.8, 22, 6),
    128: _Style(8, 3, 1.5, 0.9, 2, 2, 3.0, 20.0, 1.8, 35, 10),
    256: _Style(16, 5, 2.0, 1.0, 3, 3, 5.0, 36.0, 1.8, 30, 12),
}


def make_setting(resolution: int = 32, difficulty: str = 'hard', **overrides) -> PathfinderSetting:
  """The setting of a resolution and difficulty, with optional field overrides (e.g. ink)."""
  common.check_choice('resolution', resolution, RESOLUTIONS)
  common.check_choice('difficulty', difficulty, tuple(DIFFICULTIES))
  style = _STYLES[resolution]
  contour = DIFFICULTIES[difficulty]
  distractor_length = max(1, contour // 3)
  fields = dict(resolution=resolution, contour_length=contour,
                paddle_length=style.paddle_length, gap=style.gap, line_width=style.line_width,
                contrast=style.contrast, thickness=style.thickness, margin=style.margin,
                marker_radius=style.marker_radius, seed_distance=style.seed_distance,
                continuity=style.continuity, distractor_length=distractor_length,
                num_distractors=style.distractor_budget // distractor_length,
                num_fragments=style.num_fragments)
  fields.update(overrides)
  return PathfinderSetting(**fields)


def config_name(resolution: int, difficulty: str, ink: str = 'grey') -> str:
  """TFDS config name of a resolution, difficulty and ink."""
  return f'res{resolution}_{difficulty}' + ('' if ink == 'grey' else f'_{ink}')


SETTINGS = {config_name(r, d, ink): make_setting(r, d, ink=ink)
            for ink in INKS for r in RESOLUTIONS for d in DIFFICULTIES}
SETTINGS['tiny'] = make_setting(32, 'hard', num_train=256, num_valid=64, num_test=64)


def split_seed(setting: PathfinderSetting, split: str) -> tuple[int, int]:
  """The seed of a split's random streams."""
  common.check_choice('split', split, common.SPLITS)
  return (setting.seed, common.SPLITS.index(split))


def _to_example(record: dict) -> dict:
  """Model example of a stored record."""
  return {'inputs': common.pixels_to_tokens(record['image']),
          'targets': np.int32(record['label'])}


def load(split: str, data_dir=None, seq_len: int | None = None, resolution: int = 32,
         difficulty: str = 'hard', ink: str = 'grey', source: str = 'generated',
         config: str | None = None, prepare_if_missing: bool = False,
         skip_bad_images: bool = False) -> common.Task:
  """A Pathfinder split as pixel sequences.

  Args:
    split: 'train', 'valid' or 'test'.
    data_dir: data folder; defaults searched when None.
    seq_len: must be resolution**2 (or None).
    resolution: 32, 64, 128 (Path-X) or 256.
    difficulty: 'easy', 'intermediate', 'hard' or 'extreme' (generated only).
    ink: 'grey' (antialiased, as LRA) or 'binary' (generated only).
    source: 'generated' (prepared here) or 'lra_release' (official files).
    config: generated config name overriding resolution, difficulty and ink (e.g. 'tiny').
    prepare_if_missing: generate the data when it is not prepared yet.
    skip_bad_images: leave out (with a warning) official images that are missing or
      empty, as LRA did.

  Returns:
    The Task; examples are {'inputs': int32 [resolution**2], 'targets': int32}.
  """
  common.check_choice('split', split, common.SPLITS)
  common.check_choice('source', source, ('generated', 'lra_release'))
  common.check_choice('ink', ink, INKS)
  if config is not None:
    common.check_choice('config', config, tuple(SETTINGS))
    resolution = SETTINGS[config].resolution
  common.check_choice('resolution', resolution, RESOLUTIONS)
  length = resolution * resolution
  if seq_len not in (None, length):
    raise ValueError(f'Pathfinder-{resolution} sequences have length {length}, not {seq_len}')
  if source == 'lra_release':
    if ink != 'grey':
      raise ValueError(f"ink={ink!r}: the LRA files are grey; use source='generated'")
    examples = pathfinder_lra.source(split, data_dir, resolution, difficulty, skip_bad_images)
  else:
    from efficient_attn.data import generated  # pylint: disable=g-import-not-at-top
    common.check_choice('difficulty', difficulty, tuple(DIFFICULTIES))
    config = config or config_name(resolution, difficulty, ink)
    records = generated.load_split('pathfinder', config, split, data_dir, prepare_if_missing)
    examples = common.MappedSource(records, _to_example)
  name = 'pathx' if resolution == PATHX_RESOLUTION else 'pathfinder'
  return common.Task(name=name, split=split, source=examples, vocab_size=common.BYTE_VOCAB_SIZE,
                     num_classes=NUM_CLASSES, seq_len=length)


def load_pathx(split: str, data_dir=None, seq_len: int | None = None,
               prepare_if_missing: bool = False, **options) -> common.Task:
  """Path-X: `load` at 128x128; refuses a `resolution` or a config of another size."""
  if 'resolution' in options:
    raise ValueError(f'pathx takes no resolution (got resolution={options["resolution"]!r}): '
                     f'Path-X is Pathfinder at {PATHX_RESOLUTION} px; use '
                     f"get_task('pathfinder', resolution=...) for other sizes")
  config = options.get('config')
  if config in SETTINGS and SETTINGS[config].resolution != PATHX_RESOLUTION:
    raise ValueError(f'config={config!r} is not a Path-X config ({PATHX_RESOLUTION} px); use '
                     f"get_task('pathfinder', config={config!r})")
  return load(split, data_dir, seq_len, resolution=PATHX_RESOLUTION,
              prepare_if_missing=prepare_if_missing, **options)
