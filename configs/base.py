"""What every task config shares: the keys, the scales, the per-attention defaults.

A task file (listops.py, text.py, ...) defines `get_config(arg)` with
arg = 'attention[,scale]', e.g. 'performer,cpu'; scales:
  paper  the base configs of the public LRA code, which produced the published
         numbers (for accelerators);
  cpu    a run of minutes on 2 CPU cores that still learns the task (Pathfinder:
         about an hour, not yet shown to learn; see configs/pathfinder.py);
  tiny   seconds; for tests.
"""

import ml_collections
from ml_collections import config_dict

SCALES = ('paper', 'cpu', 'tiny')


def parse_arg(arg: str | None, default_attention: str = 'full',
              default_scale: str = 'cpu') -> tuple[str, str]:
  """(attention, scale) of a config argument 'attention[,scale]'."""
  parts = [p.strip() for p in (arg or '').split(',')] if arg else []
  if len(parts) > 2:
    raise ValueError(f"config argument {arg!r} must be 'attention[,scale]', e.g. 'lsh,cpu'")
  attention = parts[0] if parts and parts[0] else default_attention
  scale = parts[1] if len(parts) > 1 and parts[1] else default_scale
  if scale not in SCALES:
    raise ValueError(f'scale {scale!r} does not exist; available: {", ".join(SCALES)}')
  return attention, scale


def attention_defaults(attention: str, length: int, scale: str = 'cpu') -> dict:
  """Options of `attention` for sequences of `length` tokens: the one table of them.

  At `paper` scale the settings of the public LRA code replace ours where they
  differ (`LRA_ATTENTION`); at the other scales budgets shrink with the length,
  so that short sequences still split into several blocks, chunks or clusters.

  Args:
    attention: a registered attention name.
    length: tokens the attention sees (a CLS token included).
    scale: one of SCALES.

  Returns:
    Options for `make_attention`; {} for mechanisms without tunable settings.
  """
  table = {
      'lsh': {'chunk_len': max(4, min(64, length // 8)), 'n_hashes': 2},
      'linformer': {'k': max(4, min(256, length // 4)), 'max_len': length},
      'performer': {'num_features': max(16, min(256, length // 2))},
      # The models' only global token is CLS (with 'cls' pooling): one slot, no
      # per-step count check.
      'longformer': {'window': max(2, min(128, length // 8)), 'max_global': 1,
                     'check_global_count': False},
      'sinkhorn': {'block_len': max(4, min(50, length // 8))},
      'routing': {'num_clusters': max(1, round(length ** 0.5))},
      'bigbird': {'block_len': max(4, min(64, length // 16)), 'num_random_blocks': 3},
      # The public LRA code's default: factorized random logits of rank 32.
      'synthesizer': {'max_len': length, 'rank': min(32, length)},
      'local': {'block_len': max(4, min(50, length // 8))},
      # LRA: 'fixed' with l = 128 and c = 32 (c = l / 4, our default summary_len).
      'sparse': {'block_len': max(4, min(128, length // 8))},
  }
  options = table.get(attention, {})
  if scale == 'paper':
    options = {**options, **LRA_ATTENTION.get(attention, {})}
  return options


# The attention settings of the public LRA code, used at `paper` scale.
LRA_ATTENTION = {
    'lsh': {'chunk_len': 10, 'n_hashes': 1},
    'longformer': {'window': 512},
    'sinkhorn': {'block_len': 50},
    'bigbird': {'block_len': 64, 'num_random_blocks': 3},
    'local': {'block_len': 50},
    'sparse': {'block_len': 128},
}


def attention_length(seq_len: int, pooling: str) -> int:
  """Positions the attention sees: the input, plus the CLS token with 'cls' pooling."""
  return seq_len + (pooling == 'cls')


def task_config(*, task: str, attention: str, scale: str, seq_len: int, model: dict,
                data: dict | None = None, train: dict,
                task_options: dict | None = None) -> ml_collections.ConfigDict:
  """A full config with every key the trainer and the scripts rely on.

  Args:
    task: a task name of `efficient_attn.data.available_tasks()`.
    attention: a registered attention name.
    scale: one of SCALES.
    seq_len: input length of the data.
    model: model keys that differ from the defaults below.
    data: data keys that differ from the defaults below.
    train: train keys that differ from the defaults below.
    task_options: options of `get_task` (e.g. config='small').

  Returns:
    The ConfigDict.
  """
  config = ml_collections.ConfigDict()
  config.task = task
  config.task_options = task_options or {}
  config.scale = scale
  config.seed = 0
  config.parallel = 'mesh'
  model = {
      'attention': attention,
      'num_layers': 2, 'emb_dim': 64, 'num_heads': 4, 'qkv_dim': 64, 'mlp_dim': 128,
      'dropout_rate': 0.1, 'attention_dropout_rate': 0.1,
      'pos_encoding': 'sinusoidal', 'pooling': 'cls', 'dtype': 'float32',
      'reversible': False, 'ff_chunk_size': config_dict.placeholder(int),
      **model}
  length = attention_length(seq_len, model['pooling'])
  config.model = {**model, 'attention_options': attention_defaults(attention, length, scale)}
  config.data = {
      'seq_len': seq_len, 'batch_size': 32, 'data_dir': config_dict.placeholder(str),
      'prepare_if_missing': True, **(data or {})}
  config.train = {
      'steps': 1000, 'learning_rate': 1e-3, 'schedule': 'rsqrt', 'warmup_steps': 100,
      'weight_decay': 0.0, 'grad_clip': 1.0, 'grad_accum': 1,
      'eval_every': 200, 'eval_batches': 0, 'log_every': 50,
      'checkpoint_every': 200, 'keep_checkpoints': 2, **train}
  return config


# The `tiny` scale of every task: one small layer and a few steps (tests).
TINY_MODEL = {'num_layers': 1, 'emb_dim': 16, 'num_heads': 2, 'qkv_dim': 16, 'mlp_dim': 32,
              'dropout_rate': 0.0, 'attention_dropout_rate': 0.0}
TINY_TRAIN = {'steps': 6, 'warmup_steps': 2, 'learning_rate': 1e-2, 'schedule': 'constant',
              'eval_every': 3, 'eval_batches': 2, 'log_every': 1, 'checkpoint_every': 3}
TINY_DATA = {'batch_size': 8}


def byte_task_config(task: str, attention: str, scale: str, *, paper_seq_len: int,
                     paper_model: dict, paper_steps: int) -> ml_collections.ConfigDict:
  """The config of a byte-level LRA task (Text, Retrieval), which differ only at `paper` scale.

  Args:
    task: 'text' or 'retrieval'.
    attention: a registered attention name.
    scale: one of SCALES.
    paper_seq_len: bytes per document of the public LRA code.
    paper_model: its model sizes.
    paper_steps: its training steps (learning rate 0.05, warmup 8000, decay 0.1).

  Returns:
    The ConfigDict.
  """
  if scale == 'paper':
    return task_config(
        task=task, attention=attention, scale=scale, seq_len=paper_seq_len, model=paper_model,
        train={'steps': paper_steps, 'learning_rate': 0.05, 'warmup_steps': 8000,
               'weight_decay': 0.1, 'grad_clip': 0.0, 'eval_every': 1000,
               'checkpoint_every': 1000})
  if scale == 'cpu':
    return task_config(
        task=task, attention=attention, scale=scale, seq_len=512, model={},
        train={'steps': 1500, 'learning_rate': 0.05, 'warmup_steps': 300,
               'weight_decay': 0.1, 'eval_every': 500, 'eval_batches': 32})
  return task_config(task=task, attention=attention, scale=scale, seq_len=64,
                     model=TINY_MODEL, data=TINY_DATA, train=TINY_TRAIN)
