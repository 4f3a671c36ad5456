"""From per-host numpy batches to global ``jax.Array``s, and prefetching them in the background.

Each host's pipeline yields its own rows of the global batch; ``jax.make_array_from_process_local_data``
stitches the hosts' rows into one global array laid out with the batch sharding (on one host it is
a plain sharded ``device_put``). ``prefetch`` runs that transfer in a background thread so the next
batch is on the devices while the current step computes.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from resnet_jax.data import base


def to_global(batch: dict[str, Any], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Turns this host's share of a batch into global arrays.

    Args:
        batch: A (nested) dict of this host's rows, numpy arrays (leading axis: batch).
        sharding: How the global batch is laid out, e.g. ``NamedSharding(mesh, PartitionSpec("data"))``.
            The same sharding is used for every leaf (it shards the leading axis).

    Returns:
        The same structure of global ``jax.Array``s. Leaves that already are ``jax.Array``s (for
        example from ``synthetic_global_batch``) pass through unchanged.
    """

    def convert(leaf):
        if isinstance(leaf, jax.Array):
            return leaf
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(convert, batch)


_DONE = object()  # Marks the end of the source iterator in the queue.


class _Failure:
    """Carries an exception from the producer thread to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


# Stop events and threads of the running prefetchers, stopped at exit (see _stop_prefetchers),
# and the consumers handed out that are still alive (closed at exit too).
_RUNNING: set[tuple[threading.Event, threading.Thread]] = set()
_CONSUMERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
    # Stop the producers while Python can still run threads: each then closes its source iterator
    # itself. Left to interpreter finalisation, a tf.data iterator held by a frozen daemon thread
    # can make the process hang at exit.
    running = list(_RUNNING)
    for stop, _ in running:
        stop.set()
    for _, thread in running:
        thread.join(timeout=5.0)
    # A consumer never closed (a library caller that stops iterating and exits) would otherwise be
    # closed by the garbage collector during finalisation, when its ``finally`` finds the modules
    # it uses already torn down ("Exception ignored ... 'NoneType' object is not callable").
    for batches in list(_CONSUMERS):
        try:
            batches.close()
        except (ValueError, RuntimeError):  # running in another thread at exit: leave it
            pass


def prefetch(iterator: Iterable[dict[str, Any]], sharding: jax.sharding.Sharding, size: int = 2) -> Iterator[dict]:
    """Moves batches to the devices in a background thread, keeping up to ``size`` ready.

    The thread starts at once, so the first batches load while the caller does other work (for
    example compiling the train step).

    Args:
        iterator: Yields per-host numpy batches (e.g. ``train_batches(...)``); may be infinite.
            The prefetcher owns it from now on and closes it when it stops.
        sharding: The batch sharding, passed to ``to_global``.
        size: How many global batches may wait on the devices (2 hides one transfer behind a step
            while bounding device memory).

    Returns:
        An iterator of global batches, in the order of ``iterator``. An exception raised by
        ``iterator`` or by the transfer is re-raised by it. Closing it stops the thread and waits
        until the source is closed; dropping it stops the thread.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}.")
    source = iter(iterator)
    base.claim(source)  # closed by the producer thread below, never concurrently by an exit hook
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        # Poll so that a consumer that went away (stop set) never leaves this thread blocked forever.
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in source:
                if not put(to_global(batch, sharding)):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(error))
        finally:
            try:
                # In this thread, where the source runs: releases its tf.data iterator now.
                getattr(source, "close", lambda: None)()
            except Exception:  # noqa: BLE001 - best effort; the batches are no longer wanted
                pass
            # Only now: until the source is closed, the exit hook must wait for this thread. A
            # thread still inside TensorFlow's C++ when the interpreter finalises is killed by a
            # forced unwind that TF does not rethrow: "FATAL: exception not rethrown", abort.
            _RUNNING.discard(entry)

    thread = threading.Thread(target=produce, name="resnet_jax-prefetch", daemon=True)
    entry = (stop, thread)
    _RUNNING.add(entry)
    thread.start()

    def consume() -> Iterator[dict]:
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            # Closing returns once the producer has closed the source: a caller that closes and
            # then exits never leaves this thread inside TensorFlow while the process tears down.
            if threading.current_thread() is not thread:
                thread.join(timeout=10.0)

    batches = consume()
    weakref.finalize(batches, stop.set)  # also stop when dropped without ever being started
    _CONSUMERS.add(batches)
    return batches
