"""One object per running event loop, for state with loop-bound tasks and connections."""
from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._instances: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        """Return the running loop's instance, creating it on first use."""
        loop = asyncio.get_running_loop()
        instance = self._instances.get(loop)
        if instance is None:
            instance = self._factory()
            self._instances[loop] = instance
        return instance

    def pop(self) -> T | None:
        """Forget and return the running loop's instance, if it has one."""
        return self._instances.pop(asyncio.get_running_loop(), None)
