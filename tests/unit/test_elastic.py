"""Elastic training's pieces that need no cluster: the stream layout that keeps the global batch
the same at every world size, the data position rescaled at a resize, the interleaving of a
worker's streams, and the config's worker bounds."""

import threading

import pytest

from ecar.config import ConfigError, worker_bounds
from ecar.presets import get_config
from ecar.train.loop import TrainState
from ecar.train.streams import interleave, rank_streams, rescale_position, stream_count

pytestmark = pytest.mark.unit


def _train(*overrides):
    return get_config("ecar-debug", ["train.global_batch_size=32", "train.micro_batch_size=4", *overrides]).train


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_world_size_trains_every_slot_once_in_slot_order(world_size):
    count = stream_count(_train())
    assert count == 8
    slots = {}
    for rank in range(world_size):
        for micro, stream in enumerate(rank_streams(rank, world_size, count)):
            slots[micro * world_size + rank] = stream  # the loop seeds a micro-batch's noise by this slot
    assert slots == {slot: slot for slot in range(count)}


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2), (4, 8), (8, 2)])
def test_the_data_position_is_rescaled_to_the_same_step_of_the_epoch(saved, resumed):
    train = _train()
    steps_done = 5  # in this epoch; 8 / world micro-batches per step on each worker
    state = TrainState(step=12, epoch=1, batches_in_epoch=steps_done * 8 // saved)
    moved = rescale_position(state, train, saved, resumed)
    assert (moved.step, moved.epoch, moved.batches_in_epoch) == (12, 1, steps_done * 8 // resumed)


def test_a_position_off_a_step_boundary_is_refused():
    with pytest.raises(ValueError, match="step boundary"):
        rescale_position(TrainState(batches_in_epoch=3), _train(), 2, 1)  # 4 micro-batches per step at 2


def test_interleave_takes_one_item_from_each_in_turn_until_one_runs_out():
    assert list(interleave([iter("abc"), iter("ABCD"), iter("xyz")])) == list("aAxbBycCz")
    assert list(interleave([iter("ab")])) == ["a", "b"]


def test_interleave_reads_streams_that_start_only_together():
    """Ray Data's split streams begin an epoch only once every one of them has asked: read one
    after the other from one thread, the first would wait for the second forever."""
    barrier = threading.Barrier(3, timeout=20)

    def stream(name):
        barrier.wait()
        yield from (f"{name}{i}" for i in range(2))

    assert list(interleave([stream("a"), stream("b"), stream("c")])) == ["a0", "b0", "c0", "a1", "b1", "c1"]


def test_interleave_raises_what_a_stream_raised():
    def broken():
        yield 1
        raise OSError("shard unreadable")

    with pytest.raises(OSError, match="shard unreadable"):
        list(interleave([iter([1, 2, 3]), broken()]))


def test_worker_bounds_and_their_validation():
    assert worker_bounds(_train("train.num_workers=4")) == (4, 4)
    assert worker_bounds(_train("train.num_workers=8", "train.min_workers=2")) == (2, 8)
    with pytest.raises(ConfigError, match=r"train\.min_workers: 3 does not divide"):
        _train("train.num_workers=8", "train.min_workers=3")
    with pytest.raises(ConfigError, match=r"train\.min_workers: must lie in \[0, train\.num_workers=2\]"):
        _train("train.num_workers=2", "train.min_workers=4")
    with pytest.raises(ConfigError, match=r"train\.min_workers: elastic runs re-partition ZeRO-1/2"):
        _train("train.num_workers=2", "train.min_workers=1", "train.zero_stage=3")
