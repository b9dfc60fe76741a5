"""Training: `train_and_evaluate(config, workdir)` and its pure steps."""

from efficient_attn.train.checkpoints import CheckpointError
from efficient_attn.train.trainer import check_config, train_and_evaluate
