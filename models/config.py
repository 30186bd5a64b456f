"""Config base: dataclasses that round-trip through dicts and reject unknown keys by name."""
from __future__ import annotations

import dataclasses
import json


class ConfigBase:
    @classmethod
    def from_dict(cls, d: dict, *, what: str | None = None):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {what or cls.__name__} keys: {unknown}; known keys: {sorted(names)}")
        for f in dataclasses.fields(cls):  # a value of the wrong kind is named here, not deep inside the model
            if f.name in d and f.default is not dataclasses.MISSING and f.default is not None:
                check_kind(d[f.name], type(f.default), f"{what or cls.__name__} {f.name}")
        return cls(**d)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def read_json_object(path, what: str = "config", error: type = ValueError) -> dict:
    """A JSON file that must hold an object: invalid JSON or another kind of value is one line naming the file."""
    try:
        obj = json.loads(open(path).read())
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: a {what} must be a JSON object, found a {type(obj).__name__}")
    return obj


def check_kind(value, kind: type, what: str) -> None:
    """ValueError naming ``what`` when value is not of the kind its default has (ints pass for floats, lists for
    tuples; None passes: optional settings)."""
    if value is None:
        return
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (list, tuple),
          list: (list, tuple)}.get(kind)
    if ok is None:
        return
    if not isinstance(value, ok) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{what} must be a {kind.__name__}, got {value!r}")


def check_at_least(cfg, what: str, minimums: dict) -> None:
    """ValueError naming the first field of ``cfg`` below its minimum (``minimums``: field -> least value)."""
    for k, lo in minimums.items():
        v = getattr(cfg, k)
        if v < lo:
            raise ValueError(f"{what}: {k} must be >= {lo}, got {v}")
