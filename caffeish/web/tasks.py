"""Work a page waits on (a store import, a dataset build, a big image in tiles), run in a thread.

A Task runs one library call in its own thread with the progress bars of caffeish.apps.progress
reported to it (`progress.reporting_to`), so the page shows the same counts the CLI's bars show:
downloaded bytes, pairs written, tiles done.  The page polls `/tasks/ID.json` (state, progress,
message, the page to go to when done).  An error a user can act on (CaffeishError) becomes the
task's one-line message; anything else is logged and said in one line too, never a traceback.
At most `MAX_RUNNING` tasks run at once; finished ones are forgotten after `KEEP` of them.
"""
import itertools
import logging
import threading
import time

from caffeish.apps import progress
from caffeish.errors import CaffeishError
from caffeish.formats.io import printable

MAX_RUNNING = 2
KEEP = 200
log = logging.getLogger("caffeish.web")




class Task:
    def __init__(self, ident, title, fn):
        self.id, self.title, self.fn = ident, title, fn
        self.state = "queued"  # queued, running, done, failed
        self.stage, self.n, self.total, self.unit = "", 0, None, ""
        self.stages = []  # every stage reported with its unit, in order ("tiles of 90x60 [tile]", " [B]")
        self.message, self.result, self.next_url = "", None, None
        self.started = time.time()
        self.finished = None

    def _progress(self, desc, n, total, unit):
        self.stage, self.n, self.total, self.unit = str(desc or ""), n, total, unit
        seen = f"{self.stage} [{unit}]"
        if seen not in self.stages[-1:]:
            self.stages.append(seen)

    def run(self, slots):
        with slots:
            self.state = "running"
            try:
                with progress.reporting_to(self._progress):
                    self.result = self.fn(self)
                self.state = "done"
            except CaffeishError as e:
                self.message, self.state = printable(str(e)), "failed"
            except Exception as e:  # a bug: logged with its traceback, one line for the page
                log.exception("task %s failed", self.title)
                self.message, self.state = printable(f"{type(e).__name__}: {e}"), "failed"
            finally:
                self.finished = time.time()

    def as_dict(self):
        fraction = None
        if self.total:
            fraction = min(1.0, self.n / self.total)
        return {"id": self.id, "title": self.title, "state": self.state, "stage": self.stage, "n": self.n,
                "total": self.total, "unit": self.unit, "fraction": fraction, "message": self.message,
                "next": self.next_url if self.state == "done" else None,
                "seconds": round((self.finished or time.time()) - self.started, 2)}


class Tasks:
    def __init__(self):
        self._tasks = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_RUNNING)

    def start(self, title, fn, next_url=None):
        """Run fn(task) in a thread; next_url(task) (or a string) is where the page goes when it is done."""
        with self._lock:
            ident = f"{next(self._ids)}"
            task = Task(ident, title, fn)
            task.next_url = next_url
            self._tasks[ident] = task
            done = [k for k, t in self._tasks.items() if t.finished]
            for k in done[:max(0, len(self._tasks) - KEEP)]:
                del self._tasks[k]
        threading.Thread(target=task.run, args=(self._slots,), name=f"caffeish-task-{ident}", daemon=True).start()
        return task

    def get(self, ident):
        return self._tasks.get(ident)

    def wait(self, ident, timeout=60.0):
        """For tests and benchmarks: block until the task ends."""
        task = self._tasks[ident]
        end = time.time() + timeout
        while task.finished is None and time.time() < end:
            time.sleep(0.01)
        return task
