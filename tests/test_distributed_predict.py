"""Sharded batch prediction: the object collectives, and torchrun with 2 processes against 1."""

from trainfer import distributed


def test_object_collectives_in_a_single_process_are_identities():
    assert distributed.all_gather_object({"lines": "a\n"}) == [{"lines": "a\n"}]
    assert distributed.broadcast_object(7) == 7
