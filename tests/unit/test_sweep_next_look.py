"""The sweeper's backstop grows with the wait, so a slow backlog is not re-woken every grace."""

import pytest

from worker.store.sweep import next_look_s


@pytest.mark.parametrize(
    ("waiting_s", "expected_s"),
    [(-5, 300), (0, 300), (299, 300), (300, 300), (301, 600), (1000, 1200), (5000, 9600)],
)
def test_next_look_is_the_grace_doubled_until_it_covers_the_wait(waiting_s, expected_s):
    assert next_look_s(waiting_s, 300) == expected_s


def test_re_wakes_of_a_message_grow_logarithmically_with_its_wait():
    # A message stuck behind a backlog for an hour, swept each time its look comes due.
    grace, waited, looks = 3.0, 0.0, 0
    while waited < 3600:
        waited += next_look_s(waited, grace)
        looks += 1
    assert looks <= 12  # with a fixed grace it would be 1,200
