"""Keep TVM's informational native log lines out of the user's terminal, and its real warnings in it.

TVM's C++ runtime writes ``executable.cc:NNN: Warning: Scope Saving:`` when a Relax VM executable is
exported and ``Scope Loaded:`` when one is loaded: a listing of the executable's memory scopes, not a
problem, printed to file descriptor 2 by C++ code that no Python logging setting reaches. ``quiet_native``
sends descriptor 2 to a temporary file around such a call, then writes back every line except those
listings (the ``Scope ...:`` line and the indented scope lines after it), so any real warning or error
the call prints still reaches the terminal, in order.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager

# "[21:25:44] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:" and "... Scope Loaded:"
_SCOPE_LISTING = re.compile(r"executable\.cc:\d+: Warning: Scope (Saving|Loaded):")


def drop_scope_listings(text: str, also: re.Pattern | None = None) -> str:
    """``text`` without TVM's memory-scope listings (a ``Scope Saving:``/``Scope Loaded:`` line and the
    indented or empty lines that continue it), and without single lines matching ``also``."""
    out, in_listing = [], False
    for line in text.splitlines(keepends=True):
        if also is not None and also.search(line):
            continue
        if _SCOPE_LISTING.search(line):
            in_listing = True
            continue
        if in_listing and (not line.strip() or line[:1] in " \t"):
            continue
        in_listing = False
        out.append(line)
    return "".join(out)


@contextmanager
def quiet_native(also: re.Pattern | None = None):
    """Run the body with descriptor 2 captured; replay it without the scope listings (and lines matching
    ``also``) afterwards."""
    fd = 2  # where native code writes, whatever Python's sys.stderr is
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (OSError, ValueError):  # no descriptor 2 to capture: run the body as it is
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = drop_scope_listings(tmp.read().decode("utf-8", "replace"), also)
            if kept:
                os.write(fd, kept.encode("utf-8"))
