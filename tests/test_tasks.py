"""Which task an event belongs to: plain code, no store needed."""

from __future__ import annotations

from bridge.wire.tasks import MAX_QUERY, TaskTracker


def test_a_chat_opens_a_task_its_events_share_until_the_next_chat() -> None:
    tracker = TaskTracker()
    tracker.open("p", "s", "fix the parser")
    first = tracker.current("p", "s")
    assert tracker.current("p", "s") == first and first.query == "fix the parser"
    tracker.open("p", "s", "next turn")
    assert tracker.current("p", "s").uuid != first.uuid
    assert tracker.current("q", "s").uuid != first.uuid, "projects never share a task"


def test_an_unknown_session_has_a_stable_task_named_after_it() -> None:
    one, two = TaskTracker(), TaskTracker()  # e.g. before and after a restart
    assert one.current("p", "lost") == two.current("p", "lost")
    assert one.current("p", "lost").query == ""
    assert one.metadata("p", "lost", None) == {"task": one.current("p", "lost").uuid}


def test_the_tracker_is_bounded_and_the_query_clipped() -> None:
    tracker = TaskTracker(capacity=3)
    for n in range(5):
        tracker.open("p", f"s{n}", "x" * (MAX_QUERY + 10))
    assert len(tracker) == 3
    assert tracker.current("p", "s4").query == "x" * MAX_QUERY
    assert tracker.current("p", "s0").query == "", "the oldest session was forgotten"
    assert tracker.metadata("p", "s4", "s4")["session"] == "s4"
