# The one JSON reader: a missing or invalid file is the caller's `UserError`, naming the file.
"""Reading JSON files (plans, dataset.json, splits, properties) with one-line errors, and
flattening nested records (configs, metrics) to one level.

Each layer raises its own `UserError` subclass for its files (`PlanError`, `DataError`,
`EvaluationError`), so the reader takes the class; writing is `jaxmamba.atomic.write_text`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxmamba.errors import UserError


def read_json(path: str | Path, error: type[UserError] = UserError) -> Any:
    """The parsed JSON file at `path`; `error("{path}: file not found")` or `error("{path}: not
    valid JSON (...)")` when it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise error(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from err


def flatten(record: dict, sep: str = ".") -> dict[str, Any]:
    """The leaves of nested dicts under their joined keys: `{"a": {"b": 1}} -> {"a.b": 1}`."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update({f"{k}{sep}{kk}": vv for kk, vv in flatten(v, sep).items()})
        else:
            out[k] = v
    return out
