"""Stats of arrays (chunked and masked fast paths) against plain numpy computations."""
import numpy as np
import pytest

from attntrace.core.stats import CHUNK_VALUES, array_stats, scaled_stats


def plain(array):
    finite = array[np.isfinite(array)]
    return finite.min(), finite.max(), finite.mean(), int(np.isnan(array).sum()), \
        int(np.isposinf(array).sum()), int(np.isneginf(array).sum())


@pytest.mark.parametrize("poison", [None, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("size", [1000, 3 * CHUNK_VALUES + 17])
def test_stats_match_plain_numpy(poison, size):
    array = np.random.default_rng(size).normal(size=size)
    if poison is not None:
        array[size - 5] = poison            # in the last chunk, where a chunked min could miss it
    s = array_stats(array)
    lo, hi, mean, nan, posinf, neginf = plain(array)
    assert (s.min, s.max, s.nan, s.posinf, s.neginf) == (lo, hi, nan, posinf, neginf)
    assert s.mean == pytest.approx(mean, rel=1e-12)


def test_masked_stats_count_blocked_positions():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 3, 5, 5))
    keep = np.tril(np.ones((5, 5), dtype=bool))[None, None]
    scores[..., ~keep[0, 0]] = -np.inf
    s = array_stats(scores, valid=keep)
    valid = scores[np.broadcast_to(keep, scores.shape)]
    assert (s.min, s.max, s.neginf, s.nan) == (valid.min(), valid.max(), 2 * 3 * 10, 0)
    assert s.mean == pytest.approx(valid.mean(), rel=1e-12)


def test_masked_stats_notice_a_finite_value_where_blocked():
    scores = np.zeros((1, 1, 2, 2))
    keep = np.array([[[[True, False], [True, True]]]])
    scores[0, 0, 0, 1] = 7.0                 # not -inf although blocked: the slow path counts
    s = array_stats(scores, valid=keep)
    assert s.max == 7.0 and s.neginf == 0


def test_scaled_stats():
    array = np.array([-2.0, 1.0, 4.0])
    s = scaled_stats(array_stats(array), 0.5)
    assert (s.min, s.max, s.mean) == (-1.0, 2.0, 0.5)
