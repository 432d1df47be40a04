"""The run config's schema: every key, its type, default, range, choices and help, in one list.

The schema is *derived*, never written twice: from the dataclass sections of
:class:`pollinate.config.RunConfig` (each field declared with :func:`setting`) and from the
four registries (:mod:`pollinate.registry`), whose entries add their own options. From it
come the defaults, the validation in :func:`pollinate.config.resolve`, the README's key
table and pyproject.toml's ``[tool.flwr.app.config]`` mirror (:mod:`pollinate.configdoc`).

A section is a frozen dataclass of :func:`setting` fields. A field named ``options`` of
type :class:`~pollinate.registry.Options` holds the options of a registry's entries
(``model.hidden`` is the ``mlp`` entry's); the section's name field points at the same
registry (``setting(..., registry=...)``), which makes the registered names its choices.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from pollinate.registry import Options, Range, Registry, Scalar

__all__ = ["Key", "RegistryRef", "keys", "options_field", "setting"]


@dataclass(frozen=True)
class RegistryRef:
    """A registry by module and attribute, imported when the schema first needs it.

    The strategy and personalization registries live in the Flower layer (server/,
    client/), above the config: naming them here keeps the config's imports downward.
    """

    module: str
    attr: str

    def get(self, load: bool) -> Registry[Any] | None:
        """The registry; None if ``load`` is false and its module is not imported yet."""
        if not load and self.module not in sys.modules:
            return None
        registry: Registry[Any] = getattr(importlib.import_module(self.module), self.attr)
        return registry


RegistrySource = RegistryRef | Callable[[], Registry[Any]]


def setting(
    default: Scalar,
    help: str,
    range: Range | None = None,
    *,
    choices: tuple[str, ...] = (),
    registry: RegistrySource | None = None,
) -> Any:
    """A config field: its default (which fixes its type), one line of help (the README's
    table), the allowed range of a number, the allowed values of a string (fixed
    ``choices``, or the names in a ``registry``)."""
    meta = {"help": help, "range": range, "choices": choices, "registry": registry}
    return field(default=default, metadata=meta)


def options_field(registry: RegistrySource) -> Any:
    """A section's ``options`` field: the option values of ``registry``'s entries, all at
    their defaults unless given (``ModelSection()`` has every model option)."""

    def defaults() -> Options:
        found = _registry(registry, load=True)
        options = found.options() if found is not None else {}
        return Options({key: option.default for key, (option, _) in options.items()})

    return field(default_factory=defaults, metadata={"registry": registry})


@dataclass(frozen=True)
class Key:
    """One flat run-config key (``strategy.proximal-mu``) and everything known about it.

    ``choices`` is None where the values are a registry's that is not loaded in this
    process (then they are not checked here); ``used_by`` names the registry entries that
    read an option key (empty for a section's own keys).
    """

    name: str
    section: str
    default: Scalar
    help: str
    range: Range | None = None
    choices: tuple[str, ...] | None = ()
    used_by: tuple[str, ...] = ()
    option: bool = False


def _registry(source: RegistrySource | None, load: bool) -> Registry[Any] | None:
    if source is None:
        return None
    if isinstance(source, RegistryRef):
        return source.get(load)
    return source()


def _field_key(section: str, f: Field[Any], load: bool) -> Key:
    source = f.metadata.get("registry")
    registry = _registry(source, load)
    choices: tuple[str, ...] | None = tuple(f.metadata.get("choices", ()))
    if source is not None:
        choices = registry.names() if registry is not None else None
    if f.default is MISSING:
        raise TypeError(f"config field {section}.{f.name} needs a default")
    return Key(
        name=f"{section}.{f.name.replace('_', '-')}",
        section=section,
        default=f.default,
        help=str(f.metadata.get("help", "")),
        range=f.metadata.get("range"),
        choices=choices,
    )


def _option_keys(section: str, f: Field[Any], load: bool) -> list[Key]:
    registry = _registry(f.metadata.get("registry"), load)
    if registry is None:
        return []
    return [
        Key(
            name=f"{section}.{key}",
            section=section,
            default=option.default,
            help=option.help,
            range=option.range,
            choices=option.choices,
            used_by=users,
            option=True,
        )
        for key, (option, users) in registry.options().items()
    ]


def keys(config_cls: type, *, load: bool = True) -> dict[str, Key]:
    """Every key of a config class (a dataclass of sections), in section and field order.

    ``load=False`` leaves out registries whose module is not imported (a ClientApp
    reading a config its server validated does not import the server's strategies).
    """
    out: dict[str, Key] = {}
    for section in fields(config_cls):
        cls = section.default_factory
        for f in fields(cls):  # type: ignore[arg-type]
            found = (
                _option_keys(section.name, f, load)
                if f.name == "options"
                else [_field_key(section.name, f, load)]
            )
            for key in found:
                if key.name in out:
                    raise ValueError(
                        f"config key {key.name} is declared twice (an option of "
                        f"{', '.join(key.used_by)} has a section key's name); rename the option"
                    )
                out[key.name] = key
    return out
