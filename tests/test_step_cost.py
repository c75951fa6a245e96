"""The engine's step-cost model: a least-squares line through recent (rows, seconds) steps."""

from __future__ import annotations

import pytest

from mlx_llama.generation.step_cost import StepCost


def test_fits_fixed_and_per_row_cost_and_sizes_a_step() -> None:
    cost = StepCost()
    assert cost.rows_within(1.0) is None
    for rows in (1, 8, 40, 8, 72, 9):
        cost.observe(rows, 0.020 + 0.005 * rows)
    fixed, per_row = cost.fit()
    assert fixed == pytest.approx(0.020) and per_row == pytest.approx(0.005)
    assert cost.rows_within(0.4225) == 80
    assert cost.rows_within(0.010) == 0


def test_without_spread_in_rows_the_whole_step_is_charged_per_row() -> None:
    cost = StepCost()
    for _ in range(4):
        cost.observe(8, 0.080)
    assert cost.fit() == (0.0, pytest.approx(0.010))
    assert cost.rows_within(0.4) == 40


def test_follows_the_recent_steps_only() -> None:
    cost = StepCost(window=4)
    for rows in (4, 16, 4, 16):
        cost.observe(rows, 0.001 * rows)  # slow history ...
    for rows in (4, 16, 4, 16):
        cost.observe(rows, 0.0001 * rows)  # ... replaced by a faster machine
    assert cost.fit()[1] == pytest.approx(0.0001)
