"""Short reprs for messages: long enough to recognise a value, never hiding its type.

Used by the task descriptions of errors and views and by the pickle doctor's
paths; imports nothing of mpnb.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["short_repr"]


class _Repr(reprlib.Repr):
    """reprlib, but an object whose repr is too long shows as its type,
    never as a cut that hides the type (``<unlocked _thread.... at 0x...>``)."""

    def repr_instance(self, x: Any, level: int) -> str:
        kind = type(x)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        try:
            text = repr(x)
        except Exception:
            return f"<{name} object>"
        if len(text) <= self.maxother:
            return text
        if text.startswith("<"):  # the default form: its middle says nothing
            return f"<{name} object>"
        return super().repr_instance(x, level)


_repr = _Repr()
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2


def short_repr(obj: Any) -> str:
    """A repr short enough for an error message, never hiding the type."""
    try:
        return _repr.repr(obj)
    except Exception:
        return f"<{type(obj).__name__}>"
