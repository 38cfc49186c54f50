"""Reading a Hugging Face `config.json` as plain data, with the aliases each release used.

We do not go through `transformers.AutoConfig`: the spec must come from the file alone, and field
names moved between releases (`rope_theta` became `rope_parameters.rope_theta`; Qwen3-MoE's
`num_experts` is saved as `num_local_experts` by transformers 5). Every lookup here accepts all
spellings we have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_core.errors import ConfigError

__all__ = ["HFConfig"]

_MISSING = object()


@dataclass(frozen=True)
class HFConfig:
    """A parsed `config.json` and the file it came from (for error messages).

    Attributes:
        data: The JSON object.
        source: Where it was read from, or a description such as `"<dict>"`.
    """

    data: dict[str, Any]
    source: str = "<dict>"

    @classmethod
    def from_file(cls, path: str | Path) -> HFConfig:
        """Read `path` (a `config.json` or a folder holding one).

        Raises:
            ConfigError: the file is missing or is not a JSON object.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls(data, str(path))

    def get(self, *names: str, default: Any = None) -> Any:
        """The value of the first of `names` present (and not null), else `default`."""
        for name in names:
            value = self.data.get(name)
            if value is not None:
                return value
        return default

    def require(self, *names: str) -> Any:
        """Like `get`, but a missing field is a `ConfigError` naming the file and field."""
        value = self.get(*names, default=_MISSING)
        if value is _MISSING:
            raise ConfigError(f"{self.source}: missing field {names[0]!r}")
        return value

    def get_int(self, *names: str, default: int | None = None) -> int:
        """An integer field; `default` when absent, or a `ConfigError` when no default is given."""
        value = self.get(*names) if default is not None else self.require(*names)
        if value is None:
            return default  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.source}: field {names[0]!r} must be an integer, "
                              f"got {value!r}")
        return value

    def get_float(self, *names: str, default: float | None = None) -> float:
        """A number field; `default` when absent, or a `ConfigError` when no default is given."""
        value = self.get(*names) if default is not None else self.require(*names)
        if value is None:
            return default  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.source}: field {names[0]!r} must be a number, got {value!r}")
        return float(value)

    def get_bool(self, *names: str, default: bool) -> bool:
        """A boolean field with a default."""
        value = self.get(*names, default=default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: field {names[0]!r} must be true or false, "
                              f"got {value!r}")
        return value

    def architecture(self) -> str:
        """The first entry of `architectures`, the name the model registry is keyed by."""
        archs = self.get("architectures")
        if not archs or not isinstance(archs, list):
            raise ConfigError(f"{self.source}: missing field 'architectures'")
        return str(archs[0])

    def rope_parameters(self, default_theta: float = 10000.0) -> dict[str, Any]:
        """Rotary settings from every spelling, as transformers reads them: a non-null
        `rope_scaling` (the legacy key) wins over `rope_parameters`; a top-level `rope_theta`
        fills in a missing theta.

        The result always has `rope_theta` and `rope_type` (`"default"` when unscaled).
        """
        scaling = self.get("rope_scaling")
        params = scaling if isinstance(scaling, dict) else self.get("rope_parameters")
        merged: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
        merged.setdefault("rope_theta", self.get("rope_theta", default=default_theta))
        merged.setdefault("rope_type", merged.get("type", "default"))
        return merged

    def eos_token_ids(self) -> tuple[int, ...]:
        """`eos_token_id` as a tuple (configs store an int, a list, or nothing)."""
        value = self.get("eos_token_id")
        if value is None:
            return ()
        if isinstance(value, int):
            return (value,)
        return tuple(int(v) for v in value)
