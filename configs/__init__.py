"""Experiment configs: one file per task, each with `get_config(arg)`."""

import importlib.util


def load_config(path: str, arg: str):
  """`get_config(arg)` of the config file at `path`."""
  spec = importlib.util.spec_from_file_location('config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
