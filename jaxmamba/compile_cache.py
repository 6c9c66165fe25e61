"""JAX's persistent compilation cache, on by default for the `train` and `predict` commands.

A second run, a resume or a prediction with the same shapes then loads its executables from disk
instead of compiling them again (JAX's `jax_compilation_cache_dir`; numbers in
docs/benchmarks.md). Where the cache lives, first match wins:

1. `train.compile_cache` of the config (train only), unless it is `auto`;
2. the environment variable `JAXMAMBA_COMPILE_CACHE`;
3. `$XDG_CACHE_HOME/jaxmamba/xla`, else `~/.cache/jaxmamba/xla`.

A value is a directory or `off` (also `0`, `false`, `no`, `none`): jaxmamba then leaves JAX's
own settings alone (no cache unless `JAX_COMPILATION_CACHE_DIR` asks for one). JAX's environment
variables for the thresholds below (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, ...) win over
jaxmamba's values. The cache is not bounded (JAX's `jax_compilation_cache_max_size` needs the
`filelock` package): delete the directory to empty it.

One exception: a run of several processes on the CPU with JAX >= 0.12.1 compiles every program
(`off_for_cpu_processes`). There, an executable that process 0 loads from the cache waits forever
in its first cross-process all-reduce (gloo); process 1 loading the same file works, and JAX
0.10.2 and 0.12.0.1 load both (measured 2026-12-07, tests/test_multiprocess.py).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXMAMBA_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")
#: Executables that compiled faster than this are not written (JAX's default is 1 s; a CPU run
#: has dozens of 0.1-1 s programs whose compilation together costs seconds).
MIN_COMPILE_TIME_S = 0.1


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxmamba" / "xla"


def resolve(setting: str | bool | None = "auto") -> Path | None:
    """The cache directory for `setting` (a directory, `off`/False (YAML reads `off` as False)
    or `auto`/None), None when off."""
    if setting is False:
        return None
    if setting is None or str(setting).strip().lower() in ("", "auto"):
        setting = os.environ.get(ENV, "").strip() or str(default_dir())
    if str(setting).strip().lower() in OFF:
        return None
    return Path(setting).expanduser()


def enable(setting: str | bool | None = "auto") -> Path | None:
    """Point JAX's persistent compilation cache at `resolve(setting)`; call before the first
    compilation. Returns the directory, None when off (JAX's settings left as they are)."""
    import jax

    path = resolve(setting)
    if path is None:
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    for option, value in (("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S),
                          ("jax_persistent_cache_min_entry_size_bytes", 0)):
        if option.upper() not in os.environ:
            jax.config.update(option, value)
    return path


#: The first JAX with the CPU multi-process cache deadlock (module docstring)
CPU_PROCESSES_DEADLOCK_FROM = (0, 12, 1)


def off_for_cpu_processes() -> str | None:
    """Turn JAX's persistent cache off for a multi-process CPU run on a JAX that deadlocks on
    executables loaded from it (module docstring); call after `jax.distributed.initialize` and
    before the first compilation. Returns the note to print, None when nothing changed."""
    import jax

    if (jax.process_count() == 1 or jax.default_backend() != "cpu"
            or jax.__version_info__ < CPU_PROCESSES_DEADLOCK_FROM
            or not jax.config.jax_enable_compilation_cache
            or not jax.config.jax_compilation_cache_dir):
        return None
    jax.config.update("jax_enable_compilation_cache", False)
    return (f"note: the compilation cache is off for this run: JAX {jax.__version__} deadlocks "
            f"in gloo when several CPU processes load cached executables, so every program is "
            f"compiled (jaxmamba/compile_cache.py)")
