"""The registries a forked child walks (``lifecycle``): what they keep and what they let go."""

from __future__ import annotations

import gc
import sys
from typing import Any

from secure_pg_backend import lifecycle
from secure_pg_backend.lifecycle import _Registry


class Thing:
    pass


class EqualToEverything:
    """A class whose ``__eq__`` makes it unhashable, as a user's wrapper subclass could be."""

    def __eq__(self, other: object) -> bool:
        return True


def test_a_registry_lists_its_live_objects_and_lets_the_dead_go() -> None:
    registry: _Registry[Any] = _Registry()
    kept, dropped = Thing(), Thing()
    registry.add(kept)
    registry.add(dropped)
    del dropped
    gc.collect()
    assert registry.live() == [kept]
    assert len(registry._refs) == 1  # the dead one removed its own reference


def test_an_unhashable_object_and_two_equal_ones_are_each_registered() -> None:
    registry: _Registry[Any] = _Registry()
    first, second = EqualToEverything(), EqualToEverything()
    registry.add(first)
    registry.add(second)
    live = registry.live()
    assert len(live) == 2 and any(x is first for x in live) and any(x is second for x in live)


def test_an_object_dying_after_the_registry_was_cleared_raises_nothing() -> None:
    registry: _Registry[Any] = _Registry()
    thing = Thing()
    registry.add(thing)
    registry.clear()  # a forked child clears the registries, then the parent's objects die
    errors: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, errors.append
    try:
        del thing
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert errors == [] and registry.live() == []


def test_a_wrapper_is_registered_when_it_is_created() -> None:
    from django.db import connections

    wrapper = connections.create_connection("default")
    assert wrapper.connection is None
    assert any(live is wrapper for live in lifecycle._wrappers.live())
