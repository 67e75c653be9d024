"""Reading YAML files into pydantic models, with one-line errors that name the field."""

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Type, TypeVar

import pydantic
import yaml

from mergekit_recycle.errors import ConfigFileError

Model = TypeVar("Model", bound=pydantic.BaseModel)
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def format_location(loc: Iterable[Any], skip: Iterable[str] = ()) -> str:
    """Render a pydantic location tuple as `tasks[0].metric`."""
    skip = set(skip)
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in skip:
            continue
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:  # keys a user could not type plainly are quoted, so the message stays one line
            text += f"[{json.dumps(str(part))}]"
    return text


def read_yaml(path: Path, error: Type[ConfigFileError]) -> Any:
    """Parse a YAML file, turning syntax errors into `error` with the line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(path, "", "not a UTF-8 text file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(path, where, f"invalid YAML: {problem}") from None


def validate_model(
    model: Type[Model],
    data: Any,
    path: Path,
    error: Type[ConfigFileError],
    context: Optional[Mapping[str, Any]] = None,
    skip_locations: Iterable[str] = (),
) -> Model:
    """Validate `data` as `model`, raising `error` for the first invalid field."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise error(path, "", f"expected a mapping of keys to values, got {kind}")
    try:
        return model.model_validate(data, context=dict(context or {}))
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        location = format_location(first["loc"], skip_locations)
        message = first["msg"]
        message = message[0].lower() + message[1:] if message else "invalid value"
        if message.startswith("value error, "):
            message = message[len("value error, ") :]
        if message.startswith("assertion failed, "):
            message = message[len("assertion failed, ") :]
        raise error(path, location, " ".join(message.split())) from None
    except (ValueError, TypeError, RuntimeError) as exc:
        # Validators of third-party models (mergekit's) raise plain exceptions.
        raise error(path, "", " ".join(str(exc).split()) or type(exc).__name__) from None
