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


def check_at_least(cfg, what: str, minimums: dict) -> None:
    """ValueError naming the first field of ``cfg`` below its minimum (``minimums``: field -> least value)."""
    for k, lo in minimums.items():
        v = getattr(cfg, k)
        if v < lo:
            raise ValueError(f"{what}: {k} must be >= {lo}, got {v}")
