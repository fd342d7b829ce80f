"""Progress bars for the tools that users wait on (folders of images, datasets, downloads).

One wrapper around tqdm so every tool behaves the same: a bar on stderr when
stderr is a terminal, nothing at all when it is piped or redirected (so logs
and `--format json` output stay clean).  `CAFFEISH_PROGRESS=1` forces the bar
on, `CAFFEISH_PROGRESS=0` off.
"""
import os
import sys

from tqdm import tqdm


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
    if disable is None:
        disable = not enabled()
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=disable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def bytes_bar(total=None, desc=None, initial=0, disable=None):
    """A bar counting bytes (downloads, database writes): shows MB and MB/s."""
    return bar(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               initial=initial, disable=disable)
