"""TFDS builder (array_record) of generated Pathfinder images; configs res<R>_<difficulty>."""

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from efficient_attn.data import common
from efficient_attn.data import pathfinder


class PathfinderConfig(tfds.core.BuilderConfig):
  """A Pathfinder setting as a TFDS config."""

  def __init__(self, *, setting: pathfinder.PathfinderSetting, **kwargs):
    super().__init__(**kwargs)
    self.setting = setting


def _config(name: str, setting: pathfinder.PathfinderSetting) -> PathfinderConfig:
  """The TFDS config of a named setting."""
  return PathfinderConfig(
      name=name, setting=setting,
      description=(f'{setting.resolution}x{setting.resolution}, target paths of '
                   f'{setting.contour_length} segments, seed {setting.seed}'))


class LraPathfinder(tfds.core.GeneratorBasedBuilder):
  """Pathfinder images generated with a seed, as in Long Range Arena."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Binary ink, uniform turns of +-0.5 rad.',
      '2.0.0': "LRA's grey ink, cos^2 turns and distractor counts; binary-ink configs.",
  }
  BUILDER_CONFIGS = [_config(name, setting) for name, setting in pathfinder.SETTINGS.items()]

  def __init__(self, *, workers: int = 1, **kwargs):
    """`workers`: processes drawing images while preparing (the images do not depend on it)."""
    super().__init__(**kwargs)
    self.workers = workers

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.setting.resolution
    return self.dataset_info_from_configs(
        description='Images of dashed paths and two dots; label 1 when a path joins the dots.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(num_classes=pathfinder.NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
        homepage='https://github.com/google-research/long-range-arena',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in common.SPLITS}

  def _generate_examples(self, split):
    setting = self.builder_config.setting
    total = setting.split_sizes()[split]
    seed = pathfinder.split_seed(setting, split)
    index = 0
    with tqdm.tqdm(total=total, desc=f'Drawing Pathfinder {split}', unit=' images') as bar:
      for chunk in pathfinder.generate_chunks(total, setting, seed, workers=self.workers):
        for image, label in zip(chunk['image'], chunk['label']):
          yield index, {'image': image, 'label': int(label)}
          index += 1
        bar.update(len(chunk['label']))
