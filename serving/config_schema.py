"""How the app config's schema is strict: every section refuses keys it does not declare
(`Strict`), and a refused config is explained one line per error, each naming its dotted key
and, for an unknown key, the valid keys at that place (`explain`)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.config import ConfigFieldError


class Strict(BaseModel):
    """A config section: an unknown key is an error."""

    model_config = ConfigDict(extra="forbid")


def explain(err: ValidationError, root: type[BaseModel]) -> str:
    """One line per error of validating `root`, `dotted.key: problem`; an unknown key lists the
    valid keys there."""
    lines = []
    for e in err.errors():
        loc = [str(part) for part in e["loc"]]
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # model, dataclass
            valid = ", ".join(sorted(_keys_at(root, loc[:-1])))
            lines.append(f"{'.'.join(loc)}: unknown key; valid keys: {valid}")
            continue
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, ConfigFieldError):  # a dataclass's check: name the field itself
            loc, problem = loc + [cause.field], cause.problem
        else:
            problem = e["msg"].removeprefix("Value error, ")
        lines.append(f"{'.'.join(loc) or 'config'}: {problem}")
    return "invalid app config: " + "; ".join(lines)


def _keys_at(root: type[BaseModel], path: list[str]) -> list[str]:
    """The valid keys of the section at `path` under `root` (a BaseModel or a dataclass)."""
    section: Any = root
    for part in path:
        section = _fields_of(section)[part]
    return list(_fields_of(section))


def _fields_of(section: Any) -> dict[str, Any]:
    if isinstance(section, type) and issubclass(section, BaseModel):
        return {name: f.annotation for name, f in section.model_fields.items()}
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}
