"""TFDS builder (array_record) of the generated ListOps data; configs 'lra' and 'small'."""

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from efficient_attn.data import common
from efficient_attn.data import listops


class ListOpsConfig(tfds.core.BuilderConfig):
  """A ListOps setting as a TFDS config."""

  def __init__(self, *, setting: listops.ListOpsSetting, **kwargs):
    super().__init__(**kwargs)
    self.setting = setting


def _config(name: str, setting: listops.ListOpsSetting) -> ListOpsConfig:
  """The TFDS config of a named setting."""
  return ListOpsConfig(
      name=name, setting=setting,
      description=(f'lengths {setting.min_length}-{setting.max_length}, depth <= '
                   f'{setting.max_depth}, <= {setting.max_args} arguments, seed {setting.seed}'))


class LraListops(tfds.core.GeneratorBasedBuilder):
  """ListOps generated with a seed, in the Long Range Arena setting."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [_config(name, setting) for name, setting in listops.SETTINGS.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='ListOps expressions (token ids) and their values.',
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(None,), dtype=np.uint8,
                                           encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(num_classes=listops.NUM_CLASSES),
        }),
        supervised_keys=('tokens', 'label'),
        disable_shuffling=True,
        homepage='https://github.com/google-research/long-range-arena',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    setting = self.builder_config.setting
    total = sum(setting.split_sizes().values())
    with tqdm.tqdm(total=total, desc='Generating ListOps', unit=' examples') as bar:
      splits = listops.generate_splits(setting, progress=bar.update)
    return {split: self._generate_examples(*splits[split]) for split in common.SPLITS}

  def _generate_examples(self, tokens, labels):
    for i, (sequence, label) in enumerate(zip(tokens, labels)):
      yield i, {'tokens': sequence, 'label': int(label)}
