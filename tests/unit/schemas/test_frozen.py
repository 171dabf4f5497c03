"""`fast_init`: the same constructor as the dataclass's own, only faster."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

import pytest

from schemas import models
from schemas.frozen import fast_init


@fast_init
@dataclass(frozen=True, slots=True)
class Sample:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Reference:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)


def test_same_signature_defaults_and_factories_as_the_dataclass() -> None:
    ours, theirs = inspect.signature(Sample).parameters, inspect.signature(Reference).parameters
    assert list(ours) == list(theirs) == ["a", "b", "c"]
    assert ours["a"].default is inspect.Parameter.empty and ours["b"].default == "b"
    s = Sample(1)
    assert (s.a, s.b, s.c) == (1, "b", [])
    assert Sample(1).c is not Sample(1).c  # a fresh default per instance
    assert Sample(2, "x", [3]) == Sample(a=2, b="x", c=[3])
    assert dataclasses.replace(s, b="y") == Sample(1, "y", [])
    with pytest.raises(TypeError):
        Sample()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Sample(1, "b", [], 4)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Sample(1, d=4)  # type: ignore[call-arg]


def test_instances_stay_frozen_and_hashable() -> None:
    s = Sample(1, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.a = 2  # type: ignore[misc]
    assert hash(Sample(1, "x", None)) == hash(Sample(1, "x", None))  # type: ignore[arg-type]


def test_every_model_has_it_and_builds_what_the_dataclass_builds() -> None:
    for cls in vars(models).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == models.__name__:
            assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
            assert "_set0" in cls.__init__.__code__.co_names or not dataclasses.fields(cls), cls


def test_refuses_what_it_cannot_reproduce() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class KwOnly:
        a: int = field(kw_only=True)

    for cls in (NoSlots, PostInit, KwOnly):
        with pytest.raises(TypeError):
            fast_init(cls)
