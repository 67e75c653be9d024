"""Reading YAML files into pydantic models, with one-line errors that name the field; writing
files so that a reader never sees half of one."""

import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Type, TypeVar

import pydantic
import yaml

from mergekit_recycle.errors import ConfigFileError

Model = TypeVar("Model", bound=pydantic.BaseModel)
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def format_location(loc: Iterable[Any]) -> str:
    """Render a location tuple as `tasks[0].metric`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:  # keys a user could not type plainly are quoted, so the message stays one line
            text += f"[{json.dumps(str(part))}]"
    return text


def user_location(loc: Iterable[Any], data: Any, missing: bool) -> str:
    """The part of a pydantic error location that the user wrote.

    pydantic adds the names of union members (`constrained-float`, a discriminator's
    tag) to locations; following the location through the input drops them. The last
    part stays when the error is a missing field.
    """
    loc = list(loc)
    written, current = [], data
    for index, part in enumerate(loc):
        if isinstance(current, dict) and part in current:
            written.append(part)
            current = current[part]
        elif isinstance(current, (list, tuple)) and isinstance(part, int) and 0 <= part < len(current):
            written.append(part)
            current = current[part]
        elif missing and index == len(loc) - 1:
            written.append(part)
    return format_location(written)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; SafeLoader reports it itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, error: Type[ConfigFileError], not_found: Type[ConfigFileError]) -> Any:
    """Parse a YAML file; any problem becomes `error` (or `not_found`) with the line at fault."""
    try:
        if not path.exists():
            raise not_found(path)
        if not path.is_file():
            raise error(path, "", "a folder, not a file" if path.is_dir() else "not a file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(path, "", "not a UTF-8 text file") from None
    except OSError as exc:  # a name too long, a symlink loop, no permission: the file system's own words
        if isinstance(exc, ConfigFileError):
            raise
        if exc.errno == errno.ENAMETOOLONG:
            raise error(path, "", f"a name in this path is longer than the file system allows ({exc.strerror}): "
                        "give the file's real path") from None
        raise error(path, "", f"cannot be read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(path, where, f"invalid YAML: {problem}") from None
    except RecursionError:
        raise error(path, "", "invalid YAML: nested too deeply") from None


def validate_model(
    model: Type[Model],
    data: Any,
    path: Path,
    error: Type[ConfigFileError],
    context: Optional[Mapping[str, Any]] = None,
) -> Model:
    """Validate `data` as `model`, raising `error` for the first invalid field."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise error(path, "", f"expected a mapping of keys to values, got {kind}")
    try:
        return model.model_validate(data, context=dict(context or {}))
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        location = user_location(first["loc"], data, missing=first["type"] == "missing")
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


def write_atomically(path: Path, text: str, durable: bool = False) -> Path:
    """Write `text` to a file beside `path`, then rename it into place: a reader (or a killed run)
    sees the old file or the new one, never half of one. `durable` also survives a power cut (the
    file and the rename are synced), for files that cannot be rebuilt, like a journal."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(partial, path)
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path
