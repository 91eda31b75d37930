"""The registry: parts, algorithms and engines found by name, a user's by import path.

Built-in parts register themselves under a short name (``register("aggregator", "mean")``);
anything else is named by its import path, ``"my_lab.agg:Median"``. A part is a dataclass
whose init fields are its parameters, so it can say its config back (``part_config``) and
be rebuilt from a TOML section validated against those parameters (``build_part``), with one
message template: ``where.parameter: problem (got value)``, and a "did you mean" for near
misses.

Example:
    >>> from potluck.aggregate import WeightedMean
    >>> part_config("aggregator", WeightedMean())
    {'name': 'mean'}
    >>> build_part("aggregator", {"name": "mean"}, "aggregator")
    WeightedMean()
    >>> build_part("aggregator", {"name": "meen"}, "aggregator")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    potluck.core.registry.RegistryError: aggregator.name: unknown aggregator 'meen' (did you ...
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

KINDS = (
    "sampler",
    "stragglers",
    "optimizer",
    "term",
    "transform",
    "downlink",
    "aggregator",
    "server",
    "algorithm",
    "engine",
    "attack",
)
# the modules whose import registers the built-ins of each kind (imported on first lookup)
_BUILTINS = {
    "sampler": ("potluck.sampling",),
    "stragglers": ("potluck.sampling",),
    "optimizer": ("potluck.client.sgd",),
    "term": ("potluck.client.terms", "potluck.client.personal", "potluck.privacy.dp_sgd"),
    "transform": (
        "potluck.updates",
        "potluck.privacy.local",
        "potluck.privacy.secure_central",
        "potluck.secagg",
        "potluck.secagg.homomorphic",
    ),
    "downlink": ("potluck.updates",),
    "aggregator": (
        "potluck.aggregate",
        "potluck.privacy.central",
        "potluck.privacy.adaptive",
        "potluck.privacy.tree",
        "potluck.secagg",
        "potluck.secagg.homomorphic",
    ),
    "server": ("potluck.optim",),
    "algorithm": ("potluck.algorithms",),
    "engine": ("potluck.engines",),
    "attack": (
        "potluck.attacks.poisoning",
        "potluck.attacks.colluding",
        "potluck.attacks.backdoor",
    ),
}
_BY_NAME: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_BY_OBJECT: dict[str, dict[int, str]] = {kind: {} for kind in KINDS}
T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, an unimportable path, or parameters a part does not accept."""


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: make ``obj`` findable as ``name`` among parts of ``kind``.

    Example:
        >>> @register("aggregator", "doc_example_first")
        ... @dataclasses.dataclass(frozen=True)
        ... class First:
        ...     pass
        >>> lookup("aggregator", "doc_example_first") is First
        True
    """
    _check_kind(kind)

    def add(obj: T) -> T:
        known = _BY_NAME[kind].get(name)
        if known is not None and known is not obj:
            raise RegistryError(f"{kind} {name!r} is already registered ({known!r})")
        _BY_NAME[kind][name] = obj
        _BY_OBJECT[kind][id(obj)] = name
        return obj

    return add


def names(kind: str) -> list[str]:
    """The registered names of ``kind``, sorted.

    Example:
        >>> "fedprox" in names("term")
        True
    """
    _load_builtins(kind)
    return sorted(_BY_NAME[kind])


def lookup(kind: str, name: str, where: str | None = None) -> Any:
    """The object registered as ``name``, or the one at import path ``module:attribute``."""
    _load_builtins(kind)
    where = where or kind
    if ":" in name:
        return load_path(name, f"{where}.name")
    found = _BY_NAME[kind].get(name)
    if found is None:
        raise RegistryError(
            f"{where}.name: unknown {kind} {name!r}{_did_you_mean(name, _BY_NAME[kind])}; "
            f"registered: {', '.join(sorted(_BY_NAME[kind]))}, or an import path "
            "'package.module:Name'"
        )
    return found


def load_path(path: str, where: str = "import path") -> Any:
    """The attribute named by ``package.module:attribute`` (nested attributes with dots).

    Example:
        >>> load_path("potluck.core.registry:load_path") is load_path
        True
        >>> load_path("nope")
        Traceback (most recent call last):
        ...
        potluck.core.registry.RegistryError: import path: expected 'package.module:Name', got 'nope'
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"{where}: expected 'package.module:Name', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"{where}: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def import_path(obj: Any) -> str:
    """``module:qualname`` of a module-level class or function that imports back to itself;
    ``NotNameable`` (saying why and what to do) for lambdas, local and ``__main__`` objects.

    Example:
        >>> import_path(load_path)
        'potluck.core.registry:load_path'
        >>> import_path(lambda: 0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        potluck.core.registry.NotNameable: <lambda> is a lambda: ...
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    label = qualname or type(obj).__name__
    if module is None or qualname is None:
        raise NotNameable(f"{label!r} has no module-level name: pass a class or a function")
    if "<lambda>" in qualname:
        raise NotNameable(f"{qualname} is a lambda: define a named function at module level")
    if "<locals>" in qualname:
        raise NotNameable(
            f"{qualname} is defined inside a function: move it to module level in a module"
        )
    if module == "__main__":
        raise NotNameable(
            f"{qualname} is defined in the script being run (__main__): move it to an "
            "importable module"
        )
    path = f"{module}:{qualname}"
    try:
        back = load_path(path)
    except RegistryError:
        back = None
    if back is not obj:
        raise NotNameable(f"{path} does not import back to the same object")
    return path


class NotNameable(ValueError):
    """An object that has no import path (a lambda, a local or ``__main__`` definition)."""


def name_of(kind: str, obj: Any) -> str:
    """The name ``obj`` is found by: its registered name, else its import path."""
    _load_builtins(kind)
    registered = _BY_OBJECT[kind].get(id(obj))
    return registered if registered is not None else import_path(obj)


# ---- parts as config sections --------------------------------------------------------------


def params(part: Any) -> dict[str, Any]:
    """A part's parameters (its dataclass init fields), as TOML-able values. ``None`` values
    are left out: a parameter that may be ``None`` must default to ``None``.

    Example:
        >>> from potluck.updates import ClipNorm
        >>> params(ClipNorm(1.5))
        {'max_norm': 1.5, 'per_layer': False}
    """
    if not dataclasses.is_dataclass(part) or isinstance(part, type):
        raise NotNameable(
            f"{type(part).__name__} is not a dataclass: a part's parameters are its dataclass "
            "fields, so it can be written to a config and rebuilt"
        )
    out: dict[str, Any] = {}
    for f in dataclasses.fields(part):
        if not f.init:
            continue
        value = getattr(part, f.name)
        if value is None:
            if f.default is not None:
                raise NotNameable(
                    f"{type(part).__name__}.{f.name} is None but defaults to {f.default!r}: "
                    "TOML has no null"
                )
            continue
        out[f.name] = _plain(value, f"{type(part).__name__}.{f.name}")
    return out


def part_config(kind: str, part: Any) -> dict[str, Any]:
    """The config section of ``part``: ``{"name": ..., **params}``."""
    return {"name": name_of(kind, type(part)), **params(part)}


def build_part(kind: str, section: Mapping[str, Any], where: str) -> Any:
    """The part a config section describes, its parameters validated by the part itself."""
    if not isinstance(section, Mapping):
        raise RegistryError(f"{where}: expected a table with a name, got {section!r}")
    name = section.get("name")
    if not isinstance(name, str):
        raise RegistryError(f"{where}.name: missing or not a string (got {name!r})")
    cls = lookup(kind, name, where)
    return construct(cls, {k: v for k, v in section.items() if k != "name"}, f"{where}")


def construct(factory: Any, given: Mapping[str, Any], where: str, label: str | None = None) -> Any:
    """``factory(**given)`` after checking the names and types of ``given`` against the
    factory's dataclass fields (or signature); errors in the one message template.
    ``label`` names the factory in messages (default: its ``__name__``)."""
    for key, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RegistryError(f"{where}.{key}: must be a finite number (got {value!r})")
    accepted = _accepted(factory)
    if accepted is not None:
        for key in given:
            if key not in accepted:
                raise RegistryError(
                    f"{where}.{key}: unknown parameter of {label or _label(factory)}"
                    f"{_did_you_mean(key, accepted)}; allowed: {', '.join(accepted) or 'none'} "
                    f"(got {given[key]!r})"
                )
    try:
        return _validated(factory, dict(given), where)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, RegistryError):
            raise
        raise RegistryError(f"{where}: {exc} (got {dict(given)!r})") from None


@functools.cache
def _adapter(factory: type) -> Any:
    """A pydantic validator of dataclass ``factory``'s fields (built once per class), or
    ``None`` where pydantic cannot read its annotations (the part then checks itself)."""
    from pydantic import ConfigDict, TypeAdapter
    from pydantic.errors import PydanticSchemaGenerationError, PydanticUndefinedAnnotation

    if "__pydantic_config__" not in factory.__dict__:
        factory.__pydantic_config__ = ConfigDict(arbitrary_types_allowed=True)  # type: ignore[attr-defined]
    try:
        return TypeAdapter(factory)
    except (PydanticSchemaGenerationError, PydanticUndefinedAnnotation, NameError):
        return None


def _validated(factory: Any, given: dict[str, Any], where: str) -> Any:
    if not (isinstance(factory, type) and dataclasses.is_dataclass(factory)):
        return factory(**given)
    from pydantic import ValidationError

    adapter = _adapter(factory)
    if adapter is None:
        return factory(**given)
    try:
        return adapter.validate_python(given)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if not str(p).isdigit()]
        key = loc[0] if loc else ""
        msg = err["msg"].removeprefix("Value error, ")
        if key in given:
            raise RegistryError(f"{where}.{key}: {msg} (got {given[key]!r})") from None
        raise RegistryError(f"{where}: {msg} (got {given!r})") from None


def _accepted(factory: Any) -> list[str] | None:
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory) if f.init]
    import inspect

    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [
        n for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _label(factory: Any) -> str:
    return getattr(factory, "__name__", repr(factory))


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise NotNameable(f"{where} is a {type(value).__name__}, which a config cannot hold")


def _did_you_mean(name: str, candidates: Any) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_kind(kind: str) -> None:
    if kind not in _BY_NAME:
        raise RegistryError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")


def _load_builtins(kind: str) -> None:
    _check_kind(kind)
    for module in _BUILTINS[kind]:
        importlib.import_module(module)
