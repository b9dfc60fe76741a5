"""One writer for the metrics of a run: `metrics.jsonl` and TensorBoard events in the workdir."""

import json
import math
import pathlib


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl (one JSON object per call) and to TensorBoard.

  Only the writing process (process 0) writes; on the others every call does nothing.
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._events = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._events = SummaryWriter(str(pathlib.Path(workdir) / 'events'))

  def drop_after(self, step: int) -> None:
    """Removes lines of steps after `step`: a resumed run writes them again."""
    if not self.enabled or not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    kept = [line for line in lines if line and json.loads(line).get('step', 0) <= step]
    self.path.write_text(''.join(line + '\n' for line in kept))

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Writes `metrics` of `split` ('train', 'valid' or 'test') at `step`."""
    if not self.enabled:
      return
    values = {name: float(value) for name, value in metrics.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'split': split, **values}) + '\n')
    for name, value in values.items():
      if math.isfinite(value):
        self._events.add_scalar(f'{split}/{name}', value, int(step))

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  """The lines of a run's metrics.jsonl, as dicts."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]
