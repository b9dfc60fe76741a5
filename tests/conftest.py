"""Shared test setup: 4 host CPU devices (set before jax is imported) and data fixtures."""

import os

# 4 CPU devices for the multi-device tests; no LLVM optimisation of the compiled
# programs: the tests are tiny and compile-bound, and this halves their time.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def prepared_dir(tmp_path_factory):
  """A data folder with the tiny ListOps and Pathfinder configs prepared (once per run)."""
  from efficient_attn.data import generated  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp() / 'prepared'
  generated.prepare('listops', 'tiny', root)
  generated.prepare('pathfinder', 'tiny', root)
  return root


# Per-mechanism variants of what tests/test_contract.py checks for every
# mechanism (bfloat16, fully masked rows, multi-device): deeper, and slow to
# compile, so outside the default run; `python -m pytest -m slow` runs them.
_MECHANISM_FILES = ('test_local', 'test_sparse', 'test_bigbird', 'test_linear', 'test_sinkhorn',
                    'test_routing', 'test_synthesizer', 'test_lsh', 'test_longformer',
                    'test_performer', 'test_linformer')
_SLOW_IN_MECHANISM_FILES = ('pmap', 'bfloat16', 'fully_masked')


def pytest_collection_modifyitems(config, items):
  del config  # unused
  for item in items:
    if (item.path.stem in _MECHANISM_FILES
        and any(word in item.name for word in _SLOW_IN_MECHANISM_FILES)):
      item.add_marker(pytest.mark.slow)
