"""A global batch order that does not depend on the number of workers, so that a run checkpointed
at N workers resumes at M and trains on the batches an uninterrupted run would.

The latent data set is split into `stream_count` = global batch / micro-batch streams (Ray Data's
`streaming_split`, equal rows; deterministic because block order is preserved). Slot j of every
optimizer step is the next micro-batch of stream j. With W workers, rank r trains slots r, r + W,
r + 2W, ... (its micro-batch m is slot m * W + r), so each step sees the same micro-batches, and
each slot the same noise (`ecar.train.loop` seeds by slot), at every world size that divides the
stream count. Ray Train hands the streams out as datasets named `stream_name(j)`.

Imported only on the driver and in training workers (it needs Ray).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import ray.train

from ecar.config import TrainConfig, gradient_accumulation_steps
from ecar.train.loop import TrainState

T = TypeVar("T")
PREFIX = "train-stream-"


def stream_count(train: TrainConfig) -> int:
    return train.global_batch_size // train.micro_batch_size


def stream_name(index: int) -> str:
    return f"{PREFIX}{index:04d}"


def rank_streams(rank: int, world_size: int, count: int) -> list[int]:
    """The streams (slots) rank `rank` trains, in the order of its micro-batches."""
    return list(range(rank, count, world_size))


def rescale_position(state: TrainState, train: TrainConfig, saved_world: int, world: int) -> TrainState:
    """`state` as the worker of a `world`-worker run sees it. A worker's position counts its own
    micro-batches in the epoch; checkpoints lie on step boundaries, where every stream has given
    the same number of micro-batches, one per step."""
    steps_in_epoch, rest = divmod(state.batches_in_epoch, gradient_accumulation_steps(train, saved_world))
    if rest:
        raise ValueError(f"data position {state.batches_in_epoch} is not on a step boundary at {saved_world} workers")
    state.batches_in_epoch = steps_in_epoch * gradient_accumulation_steps(train, world)
    return state


class StreamSplit(ray.train.DataConfig):
    """Splits the one training data set into `count` streams, whatever the world size, and hands
    stream j out as dataset `stream_name(j)` (every rank may ask for any of them; each asks for
    all, since Ray Train creates a dataset's iterators when rank 0 asks for it)."""

    def __init__(self, count: int, execution_options: Any) -> None:
        super().__init__(execution_options=execution_options)
        self.count = count
        self.options = execution_options
        self._streams: list[Any] | None = None  # created in Ray Train's dataset actor, once per worker group

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            if self._streams is None:
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self.options
                self._streams = dataset.streaming_split(self.count, equal=True)
            for worker in output:
                worker[name] = self._streams[int(name.removeprefix(PREFIX))]
        return output


def datasets_for(dataset: Any, train: TrainConfig) -> dict[str, Any]:
    """Trainer `datasets`: the same data set under every stream's name (split once, see StreamSplit)."""
    return {stream_name(j): dataset for j in range(stream_count(train))}


def interleave(iterables: list[Iterable[T]], depth: int = 2) -> Iterator[T]:
    """One item from each iterable in turn until one runs out.

    Each iterable is read by its own thread: the streams of a split start an epoch together, so
    reading them one after another from one thread would wait forever at the first."""
    if len(iterables) == 1:
        yield from iterables[0]
        return
    done = object()
    stop = threading.Event()
    queues: list[queue.Queue] = [queue.Queue(maxsize=depth) for _ in iterables]

    def fill(source: Iterable[T], out: queue.Queue) -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as error:  # handed to the consumer, which raises it
            out.put(error)

    threads = [threading.Thread(target=fill, args=(s, q), daemon=True) for s, q in zip(iterables, queues)]
    for thread in threads:
        thread.start()
    try:
        while True:
            for out in queues:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        stop.set()


def worker_epochs(
    rank: int, world_size: int, train: TrainConfig, open_stream: Callable[[Any, int, int], Iterable[T]]
) -> Callable[[int], Iterator[T]]:
    """`open_epoch(epoch)` for the loop: this rank's micro-batches of `epoch`, in slot order.
    `open_stream(shard, stream, epoch)` turns a stream's Ray Train shard into micro-batches."""
    shards = {j: ray.train.get_dataset_shard(stream_name(j)) for j in range(stream_count(train))}
    mine = rank_streams(rank, world_size, stream_count(train))

    def open_epoch(epoch: int) -> Iterator[T]:
        return interleave([open_stream(shards[j], j, epoch) for j in mine])

    return open_epoch
