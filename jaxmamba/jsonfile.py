# The one JSON reader: a missing or invalid file is the caller's `UserError`, naming the file.
"""Reading JSON files (plans, dataset.json, splits, properties) with one-line errors.

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
