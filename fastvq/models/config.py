"""Config as data: dataclasses with help text and named presets, turned into CLI flags elsewhere.

Every model config subclasses ``Config``; its fields carry their --help text in
``metadata["help"]`` (``option(default, "help")``), and its ``PRESETS`` maps a preset name to
the fields that differ from the defaults ("tiny" runs on a laptop CPU, "base" wants a GPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and its --help text. Mutable defaults are copied."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    """Base of every config: presets, and a JSON round trip (tuples come back as tuples)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Config:
        """The preset called ``name`` with ``overrides`` applied on top.

        Raises:
            ValueError: unknown preset or field name.
        """
        if name not in cls.PRESETS:
            raise ValueError(f"{cls.__name__} preset must be one of {sorted(cls.PRESETS)}, got {name!r}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build from a dict such as ``to_dict`` gives (JSON lists become tuples where the default is one)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(fields)}")
        converted = {}
        for name, value in values.items():
            default = fields[name].default
            converted[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
