"""Fixtures shared by the data tests (this module holds no tests)."""

import pytest

from efficient_attn.data import generated


@pytest.fixture(scope='session')
def prepared_dir(tmp_path_factory):
  """A data folder with the tiny ListOps and Pathfinder configs prepared (once per run)."""
  root = tmp_path_factory.getbasetemp() / 'prepared'
  generated.prepare('listops', 'tiny', root)
  generated.prepare('pathfinder', 'tiny', root)
  return root
