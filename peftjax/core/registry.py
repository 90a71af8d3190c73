"""Name registries of config classes: methods (``@register_method``) and training
strategies (``@register_strategy``) register themselves the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from peftjax.errors import PeftError


def registrar(registry: dict[str, type], kind: str, base: Callable[[], type]) -> Callable[[str], Callable]:
    """``register(name)``, a class decorator that puts a frozen dataclass subclassing
    ``base()`` into ``registry`` under ``name`` and sets its ``kind`` attribute to
    ``name``. ``base`` is called at registration, so a module can build its decorator
    before defining its base class."""

    def register_as(name: str) -> Callable[[type], type]:
        def register(cls: type) -> type:
            if name in registry and registry[name] is not cls:
                raise PeftError(f"{kind} name {name!r} is already registered by {registry[name].__qualname__}")
            frozen = dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
            if not (frozen and issubclass(cls, base())):
                raise PeftError(f"{cls.__qualname__} must be a frozen dataclass subclassing {base().__name__} "
                                "to be registered")
            setattr(cls, kind, name)
            registry[name] = cls
            return cls

        return register

    return register_as
