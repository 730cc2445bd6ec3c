"""Batches pulled ahead of the training step on a background thread (the trainer's feeder)."""
from __future__ import annotations

import queue
import threading


class Prefetch:
    """Stream batches across epochs, pulled `depth` ahead on a background thread so
    decoding and collation overlap the step (torch and DALI release the GIL), the next
    epoch's pipeline start included. Items are (batch, loader state right after it,
    epoch): a checkpoint then records the position of the batches actually trained
    on, not of those waiting in the queue. `depth` 0 pulls inline."""

    def __init__(self, loader, depth: int, first_epoch: int, reset_first: bool):
        self.loader, self.first_epoch, self.reset_first = loader, first_epoch, reset_first
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stream = self._batches()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._fill, name="prefetch", daemon=True)
            self._thread.start()

    def _batches(self):
        epoch, reset = self.first_epoch, self.reset_first
        while not self._stop.is_set():
            if reset:  # else a resumed loader state already points inside this epoch
                self.loader.set_epoch(epoch)
            reset, n = True, 0
            for batch in self.loader:
                n += 1
                yield batch, self.loader.state_dict(), epoch
            if n == 0:
                raise RuntimeError(f"the loader yielded no batch for epoch {epoch}")
            epoch += 1

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._stream:
                if not self._put(item):
                    return
        except BaseException as e:  # re-raised in the training thread
            self._put(e)

    def next(self):
        if self._thread is None:
            return next(self._stream)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
