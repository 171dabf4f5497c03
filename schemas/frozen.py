"""A faster `__init__` for frozen, slotted dataclasses.

A frozen dataclass's generated `__init__` sets every field with `object.__setattr__(self, name, value)`
(a global lookup, an attribute lookup and a descriptor lookup per field), because its own `__setattr__`
raises. chatpipe builds millions of these records (every receipt decoded, every state and step folded),
and those calls were about a tenth of the processor's CPU. `fast_init` replaces the generated `__init__`
with one of the same signature (same parameters, order, defaults and default factories) that calls each
slot's descriptor setter directly. Everything else (frozen `__setattr__`, `__eq__`, `__hash__`, `__repr__`,
`replace`) stays the dataclass's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")

_HAS_FACTORY = object()


def fast_init(cls: type[T]) -> type[T]:
    """Decorate a `@dataclass(frozen=True, slots=True)` class (put it above the dataclass decorator)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast_init needs a frozen dataclass with slots")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: fast_init does not call __post_init__")
    ns: dict[str, Any] = {"_HAS_FACTORY": _HAS_FACTORY}
    args: list[str] = []
    body: list[str] = []
    for i, f in enumerate(dataclasses.fields(cls)):  # type: ignore[arg-type]
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: fast_init takes plain positional fields only")
        ns[f"_set{i}"] = cls.__dict__[f.name].__set__  # the slot's member descriptor
        value = f.name
        if f.default is not dataclasses.MISSING:
            ns[f"_default{i}"] = f.default
            args.append(f"{f.name}=_default{i}")
        elif f.default_factory is not dataclasses.MISSING:
            ns[f"_factory{i}"] = f.default_factory
            args.append(f"{f.name}=_HAS_FACTORY")
            value = f"_factory{i}() if {f.name} is _HAS_FACTORY else {f.name}"
        else:
            args.append(f.name)
        body.append(f"    _set{i}(self, {value})")
    source = f"def __init__(self, {', '.join(args)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(source, ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
