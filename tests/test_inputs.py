"""Prepared inputs shared by the models that read an image the same way: prepared once,
even when two jobs ask at once; the gate's verdict given to each job as its own."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from pydicom.dataset import Dataset

from inference.inputs import Input, SharedInputs
from inference.quality import Measures, NotAssessable, Shortfall


def _input(nbytes: int = 4096) -> Input:
    return Input(np.zeros(nbytes // 4, np.float32), Dataset(), None)


def test_two_jobs_asking_at_once_prepare_once() -> None:
    shared = SharedInputs()
    calls = 0
    started = threading.Event()

    def prepare() -> Input:
        nonlocal calls
        calls += 1
        started.set()
        time.sleep(0.2)  # the second caller arrives while this runs
        return _input()

    got: list[Input] = []

    def second() -> None:
        started.wait()
        got.append(shared.get(("a",), prepare))

    other = threading.Thread(target=second)
    other.start()
    got.append(shared.get(("a",), prepare))
    other.join()
    assert calls == 1
    assert shared.prepared == 1
    assert got[0] is got[1]
    shared.get(("b",), prepare)
    assert calls == 2


def test_the_gates_verdict_is_kept_and_raised_anew_for_each_job() -> None:
    shared = SharedInputs()
    measures = Measures(
        brightness=0.05, underexposed=0.9, overexposed=0.0, contrast=0.01, sharpness=1e-7
    )
    shortfall = Shortfall("mean brightness", 0.05, 0.15, "too dark: mean brightness 0.050")
    verdict = NotAssessable(measures, [shortfall], where="the left eye")

    def prepare() -> Input:
        raise verdict

    with pytest.raises(NotAssessable) as first:
        shared.get(("dark",), prepare)
    first.value.report = "1.2.3"  # the first job's report travels with its exception
    with pytest.raises(NotAssessable) as second:
        shared.get(("dark",), lambda: pytest.fail("prepared twice"))
    assert second.value is not first.value
    assert second.value.report == ""
    assert str(second.value) == str(first.value)


def test_other_failures_are_not_kept_and_the_oldest_inputs_go_first() -> None:
    shared = SharedInputs(max_bytes=8192)

    def broken() -> Input:
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):
        shared.get(("x",), broken)
    assert shared.get(("x",), _input).tensor.nbytes == 4096  # tried again
    shared.get(("y",), _input)
    shared.get(("z",), _input)  # 12 KiB held: "x" goes
    calls = 0

    def counted() -> Input:
        nonlocal calls
        calls += 1
        return _input()

    shared.get(("z",), counted)
    shared.get(("x",), counted)
    assert calls == 1
