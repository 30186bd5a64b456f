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
        return cls(**d)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)
