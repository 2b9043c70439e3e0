"""The one argument checker: what it accepts, and errors that name the parameter."""

from __future__ import annotations

import multiprocessing

import pytest

from airflow_provider_safeproc.errors import ConfigurationError
from airflow_provider_safeproc.validation import (
    START_METHODS,
    check_callable,
    check_choice,
    check_non_negative_int,
    check_positive_int,
    check_positive_number,
    check_tuple,
    start_method_of_context,
)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_positive_int(bad):
    assert check_positive_int("max_workers", 3) == 3
    assert check_positive_int("max_workers", None) is None
    with pytest.raises(ConfigurationError, match=r"max_workers must be an int >= 1 or None, got"):
        check_positive_int("max_workers", bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_positive_number(bad):
    assert check_positive_number("timeout", 2) == 2.0
    with pytest.raises(ConfigurationError, match=r"timeout must be a number > 0 seconds or None, got"):
        check_positive_number("timeout", bad, unit="seconds")


def test_non_negative_int_choice_tuple():
    assert check_non_negative_int("retries", 0) == 0
    with pytest.raises(ConfigurationError, match="retries must be an int >= 0, got -1"):
        check_non_negative_int("retries", -1)
    with pytest.raises(
        ConfigurationError, match="on_item_error must be one of 'fail', 'continue', got 'skip'"
    ):
        check_choice("on_item_error", "skip", ("fail", "continue"))
    with pytest.raises(ConfigurationError, match="initargs must be a tuple, got"):
        check_tuple("initargs", [1])


def test_one_error_for_anything_not_callable():
    assert check_callable("fn", len) is len
    assert check_callable("initializer", None, allow_none=True) is None
    with pytest.raises(ConfigurationError, match=r"fn must be callable, got 3 \(int\)"):
        check_callable("fn", 3)


@pytest.mark.parametrize("method", START_METHODS)
def test_a_multiprocessing_context_gives_its_start_method(method):
    assert start_method_of_context(multiprocessing.get_context(method), None) == method
    assert start_method_of_context(multiprocessing.get_context(method), method) == method


def test_a_context_that_cannot_be_honoured_is_refused():
    with pytest.raises(ConfigurationError, match="disagree"):
        start_method_of_context(multiprocessing.get_context("spawn"), "fork")
    with pytest.raises(ConfigurationError, match="mp_context must be a multiprocessing context"):
        start_method_of_context("spawn", None)
    with pytest.raises(ConfigurationError, match="start_method must be one of"):
        start_method_of_context(None, "thread")
