"""Soft and hard item timeouts, on every start method (and every engine, see conftest)."""

from __future__ import annotations

import sys
import time

import cloudpickle
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import ConfigurationError, ItemSoftTimeoutError, ItemTimeoutError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SOFT, HARD = 0.3, 2.0


def _cleans_up(x):
    try:
        time.sleep(30)
    except ItemSoftTimeoutError:
        return f"closed the browser of item {x}"


def _lets_it_propagate(x):
    time.sleep(30)


def _spins(x):
    started = time.monotonic()
    while time.monotonic() - started < 30:  # pure Python: the signal lands between bytecodes
        pass


def _ignores_it(x):
    try:
        time.sleep(30)
    except ItemSoftTimeoutError:
        time.sleep(30)


def test_an_item_that_catches_the_soft_timeout_succeeds_with_what_it_returned(pool_kind):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, item_soft_timeout=SOFT, item_timeout=HARD) as pool:
        started = time.monotonic()
        assert pool.submit(_cleans_up, 4).result(timeout=30) == "closed the browser of item 4"
        assert time.monotonic() - started < HARD


@pytest.mark.parametrize("fn", [_lets_it_propagate, _spins], ids=["sleeping", "spinning"])
def test_an_item_that_lets_it_propagate_fails_with_it(pool_kind, fn):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, item_soft_timeout=SOFT) as pool:
        outcomes = list(pool.map_outcomes(fn, [7], retries=1))
    error = outcomes[0].error
    assert isinstance(error, ItemSoftTimeoutError)
    assert error.item == 0
    assert error.timeout == SOFT
    assert str(error) == "item 0 exceeded item_soft_timeout=0.3 s"
    assert outcomes[0].attempts == 2  # it counts toward retries like any failure


def test_an_item_still_running_at_the_hard_limit_is_killed(pool_kind):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, item_soft_timeout=SOFT, item_timeout=1.0) as pool:
        with pytest.raises(ItemTimeoutError, match="item 0 exceeded item_timeout=1 s"):
            pool.submit(_ignores_it, 0).result(timeout=30)
        assert pool.submit(_cleans_up, 1).result(timeout=30) == "closed the browser of item 1"  # goes on


def test_items_that_end_in_time_never_see_it(pool_kind):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, item_soft_timeout=SOFT) as pool:
        assert list(pool.map(time.sleep, [0.01] * 20)) == [None] * 20


@pytest.mark.parametrize(
    ("hard", "soft", "message"),
    [
        (1.0, 1.0, r"item_soft_timeout \(1 s\) must be below item_timeout \(1 s\)"),
        (None, -1, "item_soft_timeout must be a number > 0 seconds or None"),
        (None, True, "item_soft_timeout must be a number > 0 seconds or None"),
    ],
)
def test_nonsense_soft_timeouts_are_refused_before_any_process_starts(hard, soft, message):
    with pytest.raises(ConfigurationError, match=message):
        SafeProcessPoolExecutor(1, item_timeout=hard, item_soft_timeout=soft)
