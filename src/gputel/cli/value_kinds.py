"""``--help`` names each option's kind of value (``SECONDS``, ``PATH``), never a Python type.

typer shows an option without a metavar by its annotation (``--pid <int>``, ``<list[Path]>``) and
an argument by its metavar followed by the same type (``ID <str>``). Every gputel option declares
its kind; :func:`install` makes the rest follow the same rule: an argument shows its metavar
only, and an option without one gets a kind from its type (``TEXT``, ``N``, ``NUMBER``,
``PATH``), so a new option cannot bring a type name into the help.
"""

from __future__ import annotations

import re
from typing import Any

#: typer's type label (inside ``<...>``) → the kind shown.
_KINDS = {"str": "TEXT", "int": "N", "float": "NUMBER", "path": "PATH", "Path": "PATH"}
_LABEL = re.compile(r"^<(?:list\[)?([A-Za-z_]+)\]?>$")

_installed = False


def kind_of(label: str | None) -> str | None:
    """``<int>`` → ``N``, ``<list[Path]>`` → ``PATH``; a choice (``a|b``) and None as they are."""
    if label is None:
        return None
    m = _LABEL.match(label)
    if m is None:
        return label.strip("<>")
    return _KINDS.get(m.group(1), "VALUE")


def install() -> None:
    """Patch typer's parameter classes once (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    from typer.core import TyperArgument, TyperOption

    typed = TyperOption.display_type_rich

    def option_kind(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None:
            return str(self.metavar)
        return kind_of(typed(self, ctx))

    TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
    TyperOption.display_type_rich = option_kind  # type: ignore[method-assign]
