"""The embedded engine: this process loads the model once and streams the cases through it.

A reader thread reads the next CT while the network runs on the current one, and a writer thread writes
the previous case's folder; torch, SimpleITK's readers and writers and zlib release the GIL, so the three
overlap. Each queue holds one case, which bounds memory at about three cases.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from AttentionUNetSegLib import outputs

from . import steps
from .inputs import Case

READ_AHEAD = 1  # CTs read while the network is busy
WRITES_IN_FLIGHT = 2  # results waiting for the writer

OnOk = Callable[[Case, dict], None]  # the case's report holds its seconds
OnError = Callable[[Case, str, float], None]


def run(cases: list[Case], out_dir: Path, layout: steps.Layout, segmenter, on_ok: OnOk, on_error: OnError) -> None:
    """Segment every case; each ends in ``on_ok(case, report)`` or ``on_error(case, reason, seconds)``.

    On Ctrl-C the cases being written are finished (they stay whole), the rest are left for the next run.
    """
    model_name = outputs.model_name(segmenter.model)
    stop = threading.Event()
    loaded: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    reader = threading.Thread(target=_read_all, args=(cases, layout, loaded, stop), name="batch-reader", daemon=True)
    writes = threading.BoundedSemaphore(WRITES_IN_FLIGHT)
    reader.start()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as writer:
        try:
            for _ in cases:
                item, read_seconds = loaded.get()
                if isinstance(item, BaseException):
                    on_error(item.case, steps.one_line(item.error), read_seconds)
                    continue
                try:
                    result, segment_seconds = steps.segment(segmenter, item)
                except Exception as exc:  # noqa: BLE001 - one case's failure is its row; the batch goes on
                    on_error(item.case, steps.one_line(exc), read_seconds)
                    continue
                seconds = read_seconds + segment_seconds
                writes.acquire()
                job = writer.submit(steps.write, out_dir, item, layout, result, seconds, model_name)
                job.add_done_callback(_recorder(item.case, seconds, on_ok, on_error, writes))
        except BaseException:
            stop.set()
            # The reader must end before the interpreter does: a daemon thread inside a SimpleITK read at exit
            # aborts the process ("FATAL: exception not rethrown") instead of exiting 130
            while reader.is_alive():
                _drain(loaded)  # unblocks the reader so it sees the stop
                reader.join(0.1)
            raise


class _ReadFailed(Exception):
    def __init__(self, case: Case, error: BaseException):
        super().__init__(str(error))
        self.case, self.error = case, error


def _read_all(cases: list[Case], layout: steps.Layout, loaded: queue.Queue, stop: threading.Event) -> None:
    for case in cases:
        if stop.is_set():
            return
        started = time.perf_counter()
        try:
            item = steps.read(case, layout)
        except Exception as exc:  # noqa: BLE001 - reported as the case's row by the main thread
            item = _ReadFailed(case, exc)
        loaded.put((item, time.perf_counter() - started))


def _recorder(case: Case, seconds: float, on_ok: OnOk, on_error: OnError, writes: threading.BoundedSemaphore):
    def record(job: Future) -> None:
        writes.release()
        if job.cancelled():
            return
        error = job.exception()
        if error is None:
            on_ok(case, job.result())
        else:
            on_error(case, steps.one_line(error), seconds)

    return record


def _drain(items: queue.Queue) -> None:
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return
