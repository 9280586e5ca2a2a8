"""DeepSpeed imported with its log on stderr.

DeepSpeed's logger writes to stdout, and it warns at import (which accelerator it picked): results
a command prints on stdout (``bla eval perplexity ... > out.json``) would not be JSON. Every module
of the stack imports DeepSpeed through ``deepspeed()``."""

from __future__ import annotations

import contextlib
import logging
import sys


def deepspeed():
    """The ``deepspeed`` module, its log handlers on stderr."""
    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):  # the handler made at import takes sys.stdout as it is now
            import deepspeed  # noqa: F401
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return sys.modules["deepspeed"]
