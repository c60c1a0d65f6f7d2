"""Package attributes loaded on first use (PEP 562), so that importing a package imports none of its modules."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping


def lazy_attributes(package: str, exports: Mapping[str, Iterable[str]], submodules: Iterable[str] = (),
                    extra: Mapping[str, str] | None = None) -> tuple[Callable, Callable, list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) of `package`: each name of `exports[module]` (and of `extra`,
    name -> module) comes from `package.module`, each of `submodules` is that module; a name is imported
    once, then cached in the package's namespace."""
    owner = {name: module for module, names in exports.items() for name in names} | dict(extra or {})
    modules = set(submodules) | set(exports)
    names = sorted(owner)

    def __getattr__(name: str):
        if name in owner:
            value = getattr(importlib.import_module(f"{package}.{owner[name]}"), name)
        elif name in modules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(names))

    return __getattr__, __dir__, names
