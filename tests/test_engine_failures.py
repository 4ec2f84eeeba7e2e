"""FailureTriage: who pays for a failed engine step (no engine needed)."""

import pytest

from pagedjax.server.engine_failures import FailureTriage, is_device_error

ERROR = OverflowError("int32")


def test_a_lone_suspect_is_guilty_and_no_suspect_or_a_device_error_is_fatal():
    triage = FailureTriage()
    assert triage.verdict(ERROR, ["a"]).guilty == "a"
    assert triage.verdict(ERROR, []).fatal
    assert triage.verdict(MemoryError(), ["a"]).fatal
    assert is_device_error(MemoryError()) and not is_device_error(ERROR)
    assert not triage.active


@pytest.mark.parametrize("culprit", [0, 3, 6])
def test_suspects_are_readmitted_by_halves_until_the_culprit_is_alone(culprit):
    triage = FailureTriage()
    suspects = list(range(7))
    verdict = triage.verdict(ERROR, suspects)
    assert set(verdict.readmit) == set(suspects) and triage.active
    triage.hold("late")  # an arrival during the triage waits behind the suspects
    failures, cleared = 1, []
    while triage.active:
        trial = triage.admit()
        assert trial and triage.admit() == []  # one trial at a time
        if culprit in trial:
            failures += 1
            verdict = triage.verdict(ERROR, trial)
            if verdict.guilty is not None:
                assert verdict.guilty == culprit
                culprit = None
        else:
            for item in trial:
                triage.cleared(item)
                cleared.append(item)
    assert culprit is None and failures <= 4
    assert sorted(cleared, key=str) == sorted([i for i in suspects if i != verdict.guilty]
                                              + ["late"], key=str)
    assert cleared[-1] == "late"


def test_a_request_leaving_during_the_triage_is_forgotten():
    triage = FailureTriage()
    triage.verdict(ERROR, ["a", "b", "c", "d"])
    trial = triage.admit()
    assert trial == ["a", "b"] and triage.num_held == 2
    triage.cleared("c")  # left while held
    for item in trial:
        triage.cleared(item)
    assert triage.admit() == ["d"]
    triage.cleared("d")
    assert not triage.active
