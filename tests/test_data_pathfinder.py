"""Pathfinder: shapes, balance, determinism, real connectivity, storage and the LRA-file reader."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from tensorflow_datasets.core import hashing

from configs import pathfinder as pathfinder_config
from efficient_attn.data import CorruptDataError, MissingDataError, get_task, pathfinder
from efficient_attn.data import pathfinder_draw
from efficient_attn.train import trainer

SETTING = pathfinder.SETTINGS['res32_hard']


@pytest.fixture(scope='module')
def debug_images():
  return pathfinder.generate(256, SETTING, seed=5, debug=True)


def test_shapes_dtypes_and_exact_balance(debug_images):
  assert debug_images['image'].shape == (256, 32, 32)
  assert debug_images['image'].dtype == np.uint8
  assert debug_images['label'].sum() == 128


def test_positives_connect_the_dots_and_negatives_do_not(debug_images):
  for solid, markers, label in zip(debug_images['solid'], debug_images['markers'],
                                   debug_images['label']):
    components, _ = ndimage.label(solid, structure=np.ones((3, 3)))
    (y0, x0), (y1, x1) = markers
    assert components[y0, x0] > 0 and components[y1, x1] > 0
    assert (components[y0, x0] == components[y1, x1]) == bool(label)


def test_target_paths_start_away_from_the_edges(debug_images):
  # As LRA: the first target starts 2 * seed_distance (14 px) from the edges, the
  # second seed_distance from it; the first dot marks one of those starts.
  origin_dots = debug_images['markers'][:, 0]
  assert origin_dots.min() >= 14 - 7 - 1 and origin_dots.max() <= 32 - 14 + 7
  assert (debug_images['markers'][:, 1] <= 2).any()  # the other dot may be anywhere


def test_paths_are_dashed_with_distractors_and_inked_dots(debug_images):
  images, solid = debug_images['image'] > 0, debug_images['solid']
  assert not (images & ~solid).any()  # all ink lies on a path or a dot
  assert len(np.unique(debug_images['image'])) > 5  # antialiased grey
  assert (solid & ~images).sum(axis=(1, 2)).min() > 0  # gaps between dashes
  counts = [ndimage.label(s, structure=np.ones((3, 3)))[1] for s in solid]
  assert np.median(counts) >= 6  # two targets plus distractors
  rows = np.arange(len(images))
  for end in range(2):
    y, x = debug_images['markers'][:, end].T
    assert (debug_images['image'][rows, y, x] == 255).all()


def test_binary_ink_option():
  setting = dataclasses.replace(SETTING, ink='binary')
  images = pathfinder.generate(8, setting, seed=0, debug=True)
  assert set(np.unique(images['image'])) == {0, 255}
  assert not (images['image'].astype(bool) & ~images['solid']).any()
  with pytest.raises(ValueError, match="ink='gray'.*'grey', 'binary'"):
    pathfinder.generate(8, dataclasses.replace(SETTING, ink='gray'))


def test_turns_are_cos2_weighted_to_90_degrees():
  turns = pathfinder_draw.sample_turns(np.random.default_rng(0), 1.0, 100_000)
  assert np.abs(turns).max() <= np.pi / 2
  assert abs(turns.std() - np.sqrt(np.pi ** 2 / 12 - 0.5)) < 0.01  # std of cos^2 on +-pi/2
  assert abs(np.mean(np.abs(turns) > np.pi / 4) - (0.5 - 1 / np.pi)) < 0.01
  assert np.abs(pathfinder_draw.sample_turns(np.random.default_rng(0), 1.8, 1000)).max() <= (
      np.pi / 3.6)


def test_lra_settings():
  assert [pathfinder.make_setting(r, 'hard').num_distractors for r in (32, 64, 128, 256)] == [
      5, 5, 8, 7]
  assert pathfinder.SETTINGS['res32_hard'] == pathfinder.PathfinderSetting()
  assert [pathfinder.make_setting(r).continuity for r in (32, 64)] == [1.0, 1.8]


def test_same_seed_same_images_other_seed_differs():
  first = pathfinder.generate(40, SETTING, seed=11)
  again = pathfinder.generate(40, SETTING, seed=11)
  other = pathfinder.generate(40, SETTING, seed=12)
  assert np.array_equal(first['image'], again['image'])
  assert np.array_equal(first['label'], again['label'])
  assert not np.array_equal(first['image'], other['image'])


def test_whole_chunks_do_not_depend_on_the_total(monkeypatch):
  monkeypatch.setattr(pathfinder_draw, 'IMAGES_PER_DRAW', {32: 64})
  longer = list(pathfinder.generate_chunks(100, SETTING, seed=2))
  shorter = list(pathfinder.generate_chunks(50, SETTING, seed=2))
  assert len(shorter) >= 2 and sum(len(c['label']) for c in shorter) == 50
  for key in ('image', 'label'):
    assert np.array_equal(longer[0][key], shorter[0][key])


@pytest.mark.parametrize('resolution', [64, 128])
def test_larger_resolutions(resolution):
  images = pathfinder.generate(4, pathfinder.make_setting(resolution, 'hard'), seed=0, debug=True)
  assert images['image'].shape == (4, resolution, resolution)
  for solid, markers, label in zip(images['solid'], images['markers'], images['label']):
    components, _ = ndimage.label(solid, structure=np.ones((3, 3)))
    (y0, x0), (y1, x1) = markers
    assert (components[y0, x0] == components[y1, x1]) == bool(label)


def test_unknown_resolution_or_difficulty_lists_the_valid_ones(prepared_dir):
  with pytest.raises(ValueError, match='32, 64, 128, 256'):
    get_task('pathfinder', prepared_dir, resolution=48)
  with pytest.raises(ValueError, match="'easy', 'intermediate', 'hard', 'extreme'"):
    pathfinder.make_setting(32, 'medium')
  with pytest.raises(ValueError, match="difficulty='medium'.*'easy', 'intermediate'"):
    get_task('pathfinder', prepared_dir, difficulty='medium')
  with pytest.raises(ValueError, match="difficulty='extreme'.*'easy', 'intermediate', 'hard'$"):
    get_task('pathfinder', prepared_dir, difficulty='extreme', source='lra_release')
  with pytest.raises(ValueError, match="'train', 'valid', 'test'"):
    get_task('pathfinder', prepared_dir, split='dev', config='tiny')


def test_prepared_split_matches_generator(prepared_dir):
  task = get_task('pathfinder', prepared_dir, split='valid', config='tiny')
  setting = pathfinder.SETTINGS['tiny']
  expected = pathfinder.generate(64, setting, seed=pathfinder.split_seed(setting, 'valid'))
  assert (len(task.source), task.seq_len, task.vocab_size, task.num_classes) == (64, 1024, 257, 2)
  example = task.source[3]
  assert np.array_equal(example['inputs'], expected['image'][3].reshape(-1).astype(np.int32) + 1)
  assert example['targets'] == expected['label'][3]


def test_unprepared_resolution_names_the_command(tmp_path):
  with pytest.raises(MissingDataError, match='prepare pathfinder --config res64_easy'):
    get_task('pathfinder', tmp_path, resolution=64, difficulty='easy')
  with pytest.raises(MissingDataError, match='prepare pathfinder --config res64_easy_binary'):
    get_task('pathfinder', tmp_path, resolution=64, difficulty='easy', ink='binary')
  binary = pathfinder.make_setting(64, 'easy', ink='binary')
  assert pathfinder.SETTINGS['res64_easy_binary'] == binary
  with pytest.raises(ValueError, match="ink='binary'"):
    get_task('pathfinder', tmp_path, ink='binary', source='lra_release')


def write_lra_folder(root, count=20, resolution=32):
  """A fake lra_release pathfinder folder; returns the images and labels written."""
  folder = root / 'lra_release' / f'pathfinder{resolution}' / 'curv_contour_length_14'
  (folder / 'metadata').mkdir(parents=True)
  (folder / 'imgs' / '0').mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (count, resolution, resolution), dtype=np.uint8)
  labels = rng.integers(0, 2, count)
  lines = []
  for i in range(count):
    Image.fromarray(images[i]).save(folder / 'imgs' / '0' / f'sample_{i}.png')
    lines.append(f'imgs/0 sample_{i}.png {i} {labels[i]} 1.0 14 4 2 0.5 1 1')
  (folder / 'metadata' / '0.npy').write_text('\n'.join(lines) + '\n')
  return folder, images, labels


def lra_order(count):
  """The order of LRA's TFDS 'hard' split of `write_lra_folder`'s images (as TFDS hashes keys)."""
  hasher = hashing.Hasher('hard')
  return sorted(range(count), key=lambda i: hasher.hash_key(f'imgs/0_sample_{i}.png_{i + 1}'))


def test_lra_release_reader_splits_in_lra_order(tmp_path):
  _, images, labels = write_lra_folder(tmp_path)
  order = lra_order(20)
  splits = {split: get_task('pathfinder', tmp_path, split=split, source='lra_release').source
            for split in ('train', 'valid', 'test')}
  assert [len(s) for s in splits.values()] == [16, 2, 2]
  read = [example for s in splits.values() for example in s]
  for example, index in zip(read, order):
    assert np.array_equal(example['inputs'], images[index].reshape(-1).astype(np.int32) + 1)
    assert example['targets'] == labels[index]


def test_lra_release_leaves_out_bad_images_after_slicing(tmp_path):
  folder, images, _ = write_lra_folder(tmp_path)
  order = lra_order(20)
  for index in order[2:5]:  # in train
    (folder / 'imgs' / '0' / f'sample_{index}.png').write_bytes(b'')
  with pytest.raises(CorruptDataError, match=f'sample_{order[2]}.png'):
    get_task('pathfinder', tmp_path, source='lra_release')
  train, valid = (get_task('pathfinder', tmp_path, split=split, source='lra_release',
                           skip_bad_images=True).source for split in ('train', 'valid'))
  assert len(train) == 13
  # Slicing before filtering keeps valid at [80%:90%] of all 20 listed images.
  assert len(valid) == 2
  for example, index in zip(valid, order[16:18]):
    assert np.array_equal(example['inputs'], images[index].reshape(-1).astype(np.int32) + 1)


def test_lra_release_missing_names_files_and_archive(tmp_path):
  with pytest.raises(MissingDataError) as error:
    get_task('pathfinder', tmp_path, source='lra_release')
  message = str(error.value)
  assert 'pathfinder32/curv_contour_length_14' in message and 'lra_release.gz' in message
  assert str(tmp_path) in message
  assert len(message.replace(str(tmp_path), '')) < 300
  assert message.count('lra_release.gz') == 1


def test_pathx_refuses_another_resolution(prepared_dir):
  with pytest.raises(ValueError, match='resolution=64.*128 px'):
    get_task('pathx', prepared_dir, resolution=64)
  with pytest.raises(ValueError, match="config='tiny'.*128 px"):
    get_task('pathx', prepared_dir, config='tiny')


def test_lra_release_damaged_files_are_named(tmp_path):
  folder, _, _ = write_lra_folder(tmp_path)
  order = lra_order(20)
  broken = folder / 'imgs' / '0' / f'sample_{order[3]}.png'
  broken.write_bytes(broken.read_bytes()[:30])
  task = get_task('pathfinder', tmp_path, source='lra_release')
  with pytest.raises(CorruptDataError, match=f'sample_{order[3]}.png'):
    task.source[3]  # pylint: disable=pointless-statement
  (folder / 'imgs' / '0' / f'sample_{order[7]}.png').unlink()
  with pytest.raises(CorruptDataError, match=f'sample_{order[7]}.png'):
    get_task('pathfinder', tmp_path, source='lra_release')
  assert len(get_task('pathfinder', tmp_path, source='lra_release',
                      skip_bad_images=True).source) == 15
  (folder / 'metadata' / '1.npy').write_text('imgs/0 sample_1.png\n')
  with pytest.raises(CorruptDataError, match='1.npy, line 1'):
    get_task('pathfinder', tmp_path, source='lra_release')


def test_pathx_config_lets_the_trainer_generate_missing_data(monkeypatch):
  seen = {}
  monkeypatch.setattr(pathfinder, 'load', lambda *args, **options: seen.update(options))
  config = pathfinder_config.get_config('full,tiny,128')
  trainer.load_tasks(config)
  assert seen['resolution'] == 128 and seen['prepare_if_missing'] is True
