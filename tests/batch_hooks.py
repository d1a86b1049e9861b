"""A train-iterator wrapper for fault-injection tests (test_train, launch_train)."""


class AtBatch:
  """Wraps a train iterator: its `at`-th batch (1-based) goes through `fn(batch)` (which
  may replace it or act, e.g. send a signal); the checkpointable state is the wrapped
  iterator's."""

  def __init__(self, it, at, fn):
    self._it, self._at, self._fn, self._n = it, at, fn, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._n += 1
    return self._fn(batch) if self._n == self._at else batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)
