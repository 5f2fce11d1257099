"""Parameter values that are already of their declared type skip typer's pydantic coercion.

Since typer 0.2x every parameter value goes through a pydantic ``TypeAdapter``, built for each
parameter the first time a command line is parsed, including parameters the user did not give
(their default is coerced too). For ``gputel status`` that is importing pydantic (~70 ms) and
building adapters for the 16 setting flags (~130 ms), to return strings unchanged: a flag's text
is already a ``str``, an unset flag is ``None``, a default is already an ``int`` or ``float``.

:func:`install` makes typer build a parameter's real coercion only when a value is not already of
the parameter's plain declared type (``--pid 12`` still goes through typer's own rules, with its
error messages). It does nothing on a typer without this machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_installed = False


def install() -> None:
    """Patch typer's parameters once (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from typer import _coercion, core
    except ImportError:
        return
    base = getattr(_coercion, "RuntimeParam", None)
    build = getattr(_coercion, "build_runtime_param", None)
    param_cls = getattr(core, "_TyperParameter", None)
    if base is None or build is None or param_cls is None:
        return
    if not hasattr(param_cls, "get_runtime_param"):
        return
    build_real: Callable[[Any], Any] = build

    @dataclass(frozen=True)
    class LazyRuntimeParam(base):  # type: ignore[misc, valid-type]
        """Typer's coercion for ``descriptor``, built only for a value that needs it."""

        descriptor: Any = None

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if (
                isinstance(self.annotation, type)
                and type(value) is self.annotation
                and getattr(self.parameter_info, "parser", None) is None
            ):
                return value
            real = param.__dict__.get("_gputel_real_param")
            if real is None:
                real = build_real(self.descriptor)
                param.__dict__["_gputel_real_param"] = real
            return real._coerce_value(value, param=param, ctx=ctx)

    def get_runtime_param(self: Any) -> Any:
        if self._runtime_param is None:
            descriptor = self.type_descriptor
            if descriptor.file_annotation is not None:
                self._runtime_param = build_real(descriptor)
            else:
                self._runtime_param = LazyRuntimeParam(
                    annotation=descriptor.annotation,
                    parameter_info=descriptor.parameter_info,
                    descriptor=descriptor,
                )
        return self._runtime_param

    param_cls.get_runtime_param = get_runtime_param
