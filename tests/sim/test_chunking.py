"""The evaluator's length-aware batching: an exact optimum of its cost model, covering every row once."""

import itertools

import numpy as np
import pytest

from tanbr_ray.sim.evaluate import chunk_by_width


def cost(widths, chunks, call_tokens):
    return sum(call_tokens + (e - s) * widths[e - 1] for s, e in chunks)


def brute_force(widths, call_tokens, max_rows):
    n, best = len(widths), None
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [k + 1 for k, c in enumerate(cuts) if c] + [n]
        chunks = list(zip(bounds[:-1], bounds[1:]))
        if all(e - s <= max_rows for s, e in chunks):
            c = cost(widths, chunks, call_tokens)
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_chunks_cover_rows_in_order_and_are_optimal(seed):
    rng = np.random.default_rng(seed)
    widths = sorted(rng.integers(4, 129, size=int(rng.integers(1, 11))).tolist())
    chunks = chunk_by_width(widths, call_tokens=64, max_rows=4)
    assert [s for s, _ in chunks] == [0] + [e for _, e in chunks[:-1]] and chunks[-1][1] == len(widths)
    assert all(0 < e - s <= 4 for s, e in chunks)
    assert cost(widths, chunks, 64) == brute_force(widths, 64, 4)


def test_short_rows_are_not_padded_to_a_long_one():
    assert chunk_by_width([18, 18, 18, 128], call_tokens=64) == [(0, 3), (3, 4)]
    assert chunk_by_width([30, 31, 32], call_tokens=64) == [(0, 3)]  # a call costs more than the padding
    assert chunk_by_width([]) == []


def test_unsorted_widths_are_rejected():
    with pytest.raises(ValueError, match="sorted"):
        chunk_by_width([5, 3])
