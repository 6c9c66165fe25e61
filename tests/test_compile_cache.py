"""JAX's persistent compilation cache (jaxmamba/compile_cache.py): where it lives, the off switch,
and a second process that loads what the first one compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmamba import compile_cache

TIMEOUT_S = 300
ROOT = Path(__file__).resolve().parents[1]

#: Enables the cache as the commands do, compiles a program that takes well over
#: MIN_COMPILE_TIME_S to compile (an unrolled chain of matmuls), prints JAX's cache hits and misses.
_PROGRAM = """
import json, jax, jax.numpy as jnp
from jaxmamba import compile_cache
events = {}
jax.monitoring.register_event_listener(lambda e, **kw: events.__setitem__(e, events.get(e, 0) + 1))
path = compile_cache.enable()

@jax.jit
def chain(x):
    for i in range(200):
        x = jnp.tanh(x @ x.T + i) if i % 2 else jnp.sin(x) * x
    return x

chain(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"dir": str(path), "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0)}))
"""


def _run(setting: str, **env_vars: str) -> dict:
    env = {**os.environ, compile_cache.ENV: setting, "JAX_PLATFORMS": "cpu", **env_vars}
    done = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.newest_jax
@pytest.mark.slow
def test_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "xla"
    # Every program is stored (JAX's variable wins over MIN_COMPILE_TIME_S): with the 0.1 s
    # threshold a small program that compiles in 0.09 s in one process and 0.11 s in the next
    # on a loaded machine is written by the second only (JAX counts a write as a "miss").
    store_all = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = _run(str(cache), **store_all)
    assert first["dir"] == str(cache) and first["hits"] == 0 and first["misses"] >= 1, first
    written = sorted(p.name for p in cache.iterdir())
    assert len(written) == first["misses"], (written, first)
    second = _run(str(cache), **store_all)
    assert second["hits"] == first["misses"] and second["misses"] == 0, (first, second)
    assert sorted(p.name for p in cache.iterdir()) == written  # nothing new was stored


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where `auto` would have written
    assert _run("off") == {"dir": "None", "hits": 0, "misses": 0}
    assert list(tmp_path.iterdir()) == []


def test_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.resolve() == tmp_path / "jaxmamba" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.resolve("auto") == Path.home() / ".cache" / "jaxmamba" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve(None) == tmp_path / "env"
    assert compile_cache.resolve(str(tmp_path / "cfg")) == tmp_path / "cfg"  # config wins
    assert compile_cache.resolve("~/x") == Path.home() / "x"
    for off in ("off", "OFF", "0", "false", "none", False):
        assert compile_cache.resolve(off) is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.resolve() is None
    assert compile_cache.resolve(str(tmp_path / "cfg")) == tmp_path / "cfg"


@pytest.mark.parametrize("value,expected", [("off", False), ("/tmp/x", "/tmp/x"),
                                            ("auto", "auto")])
def test_config_field(value, expected, tmp_path, monkeypatch):
    """`train.compile_cache=off` reaches the cache as off (YAML reads `off` as false)."""
    from jaxmamba.config import load_config

    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"train.compile_cache={value}"])
    assert cfg.train.compile_cache == expected
    assert (compile_cache.resolve(cfg.train.compile_cache) is None) == (value == "off")
