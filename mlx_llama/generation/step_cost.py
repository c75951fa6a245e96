"""How long an engine step takes for a given number of packed rows, learned from the steps it ran.

The engine's prefill scheduler asks it how many rows fit in a time target.  A
step costs about ``fixed + per_row * rows``: a fixed part (graph building,
one eval, per-sequence attention) and a part that grows with the rows the
matmuls carry.  Both are fitted by least squares over the most recent steps, so
the estimate follows the machine (a faster kernel, a busy CPU) instead of a
hard-coded figure.  Until the recent rows differ enough to separate the two
parts, the whole step time is charged per row, which overestimates the cost
of large steps: the scheduler then errs on the short side.
"""

from __future__ import annotations

from collections import deque

import numpy as np

WINDOW = 32  # recent steps the fit uses: long enough to span decode and prefill steps, short enough to follow load


class StepCost:
    def __init__(self, window: int = WINDOW) -> None:
        self._rows: deque[int] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)

    def observe(self, rows: int, seconds: float) -> None:
        if rows > 0 and seconds > 0:
            self._rows.append(rows)
            self._seconds.append(seconds)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per row), or None before any step was observed."""
        if not self._rows:
            return None
        r = np.asarray(self._rows, dtype=np.float64)
        t = np.asarray(self._seconds, dtype=np.float64)
        if r.max() >= 2 * r.min():
            per_row, fixed = np.polyfit(r, t, 1)
            if per_row > 0 and fixed >= 0:
                return float(fixed), float(per_row)
        return 0.0, float(t.sum() / r.sum())

    def rows_within(self, seconds: float) -> int | None:
        """The most rows a step may pack to finish within `seconds` (None: no estimate yet)."""
        f = self.fit()
        if f is None:
            return None
        fixed, per_row = f
        return max(0, int((seconds - fixed) / per_row))
