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
