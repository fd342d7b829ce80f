"""Progress bars for the tools that users wait on (folders of images, datasets, downloads).

One wrapper around tqdm so every tool behaves the same: a bar on stderr when
stderr is a terminal, nothing at all when it is piped or redirected (so logs
and `--format json` output stay clean).  `CAFFEISH_PROGRESS=1` forces the bar
on, `CAFFEISH_PROGRESS=0` off.

`reporting_to(callback)` sends the bars' counts to a callback instead, in the
calling thread only (the web app shows them as a page's progress bar):
callback(desc, n, total, unit) after every update.
"""
import contextlib
import contextvars
import os
import sys

from tqdm import tqdm

_listener = contextvars.ContextVar("caffeish_progress_listener", default=None)


@contextlib.contextmanager
def reporting_to(callback):
    """Within the block, every bar of this thread reports (desc, n, total, unit) to callback."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


class _Nowhere:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


class _Reported(tqdm):
    """A bar that draws nothing and hands its counts to a listener."""

    def __init__(self, *args, listener, **kwargs):
        self._listener = listener
        super().__init__(*args, **kwargs)
        self._report()

    def _report(self):
        self._listener(self.desc, self.n, self.total, self.unit)

    def update(self, n=1):
        shown = super().update(n)
        self._report()
        return shown

    def reset(self, total=None):
        super().reset(total)
        self._report()

    def close(self):
        if not self.disable:  # an iteration's last count is set only when it ends
            self._report()
        super().close()


def enabled(stream=None):
    """Whether a progress bar should be drawn on `stream` (default stderr)."""
    forced = os.environ.get("CAFFEISH_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable=None, *, total=None, desc=None, unit="it", unit_scale=False, disable=None, **kwargs):
    """A tqdm bar on stderr, disabled off a terminal; use as an iterable wrapper or with update()."""
    listener = _listener.get()
    if listener is not None:
        return _Reported(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=False,
                         file=_Nowhere(), leave=False, mininterval=0.2, listener=listener, **kwargs)
    if disable is None:
        disable = not enabled()
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=disable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def bytes_bar(total=None, desc=None, initial=0, disable=None):
    """A bar counting bytes (downloads, database writes): shows MB and MB/s."""
    return bar(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               initial=initial, disable=disable)
