"""The events of the decision benchmarks (issue 28), the same for our side and the baseline.

No trio here: the baseline's process imports this module, and must stay plain asyncio.

The decision is the course-capacity rule of docs/commands.md: a student may subscribe to a
course while it has fewer than `CAPACITY` subscriptions. Each course the benchmark decides on
has a ``CourseDefined`` event and a few ``StudentSubscribed`` events tagged with it, spread
evenly through many more events of other types and other tags (other courses' subscriptions
among them), so that the query's matches are a small fraction of the table, scattered.
"""

from __future__ import annotations

from typing import Final

#: The type a decision's query reads, and the one it appends.
SUBSCRIBED: Final = "StudentSubscribed"

#: A course takes this many students; the benchmark's courses never fill up.
CAPACITY: Final = 10

#: Events per stream when the events are loaded (the store's batch append: one per stream).
CHUNK: Final = 1_000

#: An event to load: its type, its tags, its data.
Event = tuple[str, list[str], dict[str, object]]


def course_tag(course: int) -> str:
    """The tag of the benchmark's course *course*."""
    return f"course:{course}"


def decision_events(count: int, courses: int, per_course: int) -> list[Event]:
    """*count* events: for each of *courses* courses, one ``CourseDefined`` and *per_course*
    ``StudentSubscribed`` events tagged ``course:<n>``, the rest of four other kinds with
    other tags (a quarter of them subscriptions to 5,000 other courses).

    The courses' events are spread evenly over the whole range, a course's subscriptions far
    apart (all definitions first, then one subscription per course, and so on).
    """
    keyed = courses * (per_course + 1)
    if not 0 < keyed <= count:
        raise ValueError(f"{keyed} course events do not fit among {count}")
    stride = count // keyed
    events: list[Event] = []
    for i in range(count):
        slot, rest = divmod(i, stride)
        if rest == 0 and slot < keyed:
            wave, course = divmod(slot, courses)
            if wave == 0:
                events.append(("CourseDefined", [course_tag(course)], {"capacity": CAPACITY}))
            else:
                student = f"s{course}-{wave}"
                events.append(
                    (SUBSCRIBED, [course_tag(course), f"student:{student}"], {"student": student})
                )
        elif i % 4 == 0:
            events.append(("StudentRegistered", [f"student:x{i}"], {"name": f"x{i}"}))
        elif i % 4 == 1:
            other = f"x{i % 5_000}"
            events.append((SUBSCRIBED, [f"course:{other}", f"student:x{i}"], {"student": f"x{i}"}))
        elif i % 4 == 2:
            events.append(("InvoiceIssued", [f"invoice:{i}"], {"amount": i % 100}))
        else:
            events.append(("PaymentReceived", [f"invoice:{i - 1}"], {"amount": i % 100}))
    return events
