"""Evaluation metrics that are pure arithmetic: HyperScore."""

import math

import numpy as np
import pytest

from aro_jax.training.evaluation import hyperscore


def test_hyperscore_by_hand():
    # V = 1: sigmoid(-ln 2) = 1/3, so 100 (1 + 1/9).
    assert hyperscore(1.0) == pytest.approx(100 * (1 + 1 / 9))
    z = 5 * math.log(0.95) - math.log(2)
    assert hyperscore(0.95) == pytest.approx(100 * (1 + (1 / (1 + math.exp(-z))) ** 2))
    assert hyperscore(0.95) == pytest.approx(107.78, abs=0.01)


def test_hyperscore_is_increasing_and_bounded():
    v = np.linspace(0.2, 1.0, 50)
    h = hyperscore(v)
    assert np.all(np.diff(h) > 0) and np.all(h > 100) and h[-1] <= 100 * (1 + 1 / 9) + 1e-9


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_hyperscore_rejects_v_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="V in"):
        hyperscore(bad)
