"""The page's job board: Interrupt and Skip reach only the job of the session that asks."""

from __future__ import annotations

from webui.ui.jobs import JobBoard


def test_interrupt_and_skip_reach_only_the_callers_job() -> None:
    board = JobBoard()
    alice, bob = board.start("alice"), board.start("bob")
    assert board.interrupt("bob")
    assert bob.interrupted and not alice.interrupted
    assert board.skip("alice")
    assert alice.skipped and not bob.skipped
    assert not board.interrupt("mallory")  # no job of theirs: nothing happens to others
    assert not alice.interrupted


def test_a_finished_job_can_no_longer_be_interrupted() -> None:
    board = JobBoard()
    first = board.start("alice")
    board.finish("alice", first)
    assert not board.interrupt("alice")
    second = board.start("alice")
    board.finish("alice", first)  # a late finish of the old job leaves the new one registered
    assert board.interrupt("alice") and second.interrupted
