"""Name → class registries, one per extension point, each mirrored by a ``conf/<group>/`` folder.

Every built-in is registered by a decorator on its own class::

    from sde_diffusion.registry import SDES

    @SDES.register("my_sde")
    class MySDE(LinearSDE): ...

    SDES.build("my_sde", beta=2.0)

A registry imports the modules that hold its built-ins the first time it is asked for a name, so a
lookup never depends on what the caller happened to import. A dotted path (``mypkg.mod.MySDE`` or
``mypkg.mod:MySDE``) resolves to a class outside the package: that is what a config group's
``_target_`` uses (:func:`sde_diffusion.config.instantiate`).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Generic, Iterator, Sequence, TypeVar

T = TypeVar("T")


def import_object(path: str) -> Any:
    """The object at ``pkg.module.Name`` or ``pkg.module:Name``; ValueError naming what is missing."""
    text = str(path).strip()
    if ":" in text:
        module_name, _, attr = text.partition(":")
    else:
        module_name, _, attr = text.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path: write package.module.ClassName (or package.module:ClassName)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} for {path!r} ({err}); is its package installed or on PYTHONPATH?"
        ) from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from None
    return obj


class Registry(Generic[T]):
    """Maps names to factories; unknown names fail with the list of known ones.

    Args:
        kind: what the entries are, for messages (``"sde"``, ``"sampler"``, ...).
        modules: modules that register the built-ins; imported before the first lookup.
    """

    def __init__(self, kind: str, modules: Sequence[str] = ()) -> None:
        self.kind = kind
        self._modules = tuple(modules)
        self._loaded = not self._modules
        self._entries: Dict[str, T] = {}

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first, so that a module importing the registry does not recurse
            for name in self._modules:
                importlib.import_module(name)

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def resolve(self, name_or_path: str) -> T:
        """A registered name, or else an import path to a class defined anywhere."""
        self._load()
        if name_or_path in self._entries:
            return self._entries[name_or_path]
        if "." in str(name_or_path) or ":" in str(name_or_path):
            return import_object(name_or_path)
        return self.get(name_or_path)

    def name_of(self, obj: Any) -> str | None:
        """The registered name of ``obj`` (a class or factory), or None."""
        self._load()
        for name, entry in self._entries.items():
            if entry is obj:
                return name
        return None

    def build(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        return factory(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)


# One registry per extension point (each mirrored by conf/<group>/).
SDES: Registry = Registry("sde", ["sde_diffusion.sdes"])
MODELS: Registry = Registry("model", ["sde_diffusion.models"])
DATASETS: Registry = Registry("dataset", ["sde_diffusion.data"])
SAMPLERS: Registry = Registry("sampler", ["sde_diffusion.samplers"])
TASKS: Registry = Registry("training task", ["sde_diffusion.tasks"])          # train.py task=<name>
SAMPLE_TASKS: Registry = Registry("sampling task", ["sde_diffusion.jobs"])    # sample.py task=<name>
MODES: Registry = Registry("mode", ["sde_diffusion.jobs"])                    # sample.py mode=<name>

__all__ = ["Registry", "import_object", "SDES", "MODELS", "DATASETS", "SAMPLERS", "TASKS", "SAMPLE_TASKS", "MODES"]
