"""Expected errors: faults of the user's input, reported as one line by the command line.

Every error a user can cause with their input (a config, a dataset, a plans file, a checkpoint, a
run directory, a folder of predictions) is raised as a subclass of `UserError` whose message names
the file and the field and says what to do next. `jaxmamba.cli` prints such an error (and an
`OSError`, whose message names its file) as `error: ...` without a traceback; `--debug` or
`JAXMAMBA_DEBUG=1` lets it propagate with its traceback.

This module imports nothing, so every layer (config, data, train, infer) can use it.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message names the file and the field."""


def brief(err: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters: for wrapping a library's
    error (tensorstore's carry kilobytes of JSON spec) into a `UserError`'s one line."""
    text = (str(err).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
