"""Long-sequence tasks and their input pipeline.

  task = get_task('listops', data_dir, split='train', config='small')
  batches = make_batches(task, batch_size=32, seed=0)
  batch = next(batches)  # {'inputs', 'mask', 'targets', 'weights'}: numpy arrays

Tasks: listops and pathfinder/pathx (generated here: `python -m
efficient_attn.data.prepare`), text, retrieval and image (read from copies the
user provides), stdlib_lm (byte-level language modelling on the Python standard
library). See `pipeline` for the batch structure.
"""

from efficient_attn.data.common import (PAD_ID, CorruptDataError, MissingDataError, Task,
                                        decode_bytes, encode_bytes)
from efficient_attn.data.pipeline import make_batches
from efficient_attn.data.tasks import available_tasks, get_task
