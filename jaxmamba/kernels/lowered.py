"""What a program lowered for a GPU launches: its Pallas kernels, counted, and its size.

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",)).as_text()` is a StableHLO module whose
Pallas kernels are custom calls (`@__gpu$xla.gpu.triton` for the Triton lowering, `@mosaic_gpu…`
for Mosaic GPU), each carrying its kernel's name and IR. A jitted function called several times
with the same shapes is lowered once, as a private function that `main` calls at each use, so a
kernel's launches are its call sites weighted by how often their function is called
(`kernel_launches`): what the program runs per step, not how often its text names it. The IR blobs
also say how many distinct kernels the compiler builds (`distinct_kernels`), and `module_size`
how much program the compiler is handed. Nothing here imports JAX: the module is read as text
(tests/test_lowered_step.py pins a train step's launches and size on the CPU;
benchmarks/train_step.py records the size beside each row's compile time).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import re

#: A Pallas kernel's custom call, by the backend that lowered it.
_KERNEL_CALL = re.compile(r"stablehlo\.custom_call @(__gpu\$xla\.gpu\.triton|mosaic_gpu\w*)\(")
#: The kernel's name: Triton's `name = "..."` attribute, else a `selective_scan_…` name in the
#: serialized kernel (Mosaic GPU).
_TRITON_NAME = re.compile(r'\bname = "([^"]+)"')
_SCAN_NAME = re.compile(r"selective_scan_[a-z_]+")
_IR = re.compile(r'\bir = "((?:[^"\\]|\\.)*)"|\bmodule = "((?:[^"\\]|\\.)*)"')
_FUNC = re.compile(r"^  func\.func (?:public |private )?@([\w$.-]+)\(", re.M)
_CALL = re.compile(r"(?<![\w.])call @([\w$.-]+)\(")
_OP = re.compile(r"^\s*(?:%[^=\n]*= )?\"?([a-z_][\w.]*)[\s\"(]", re.M)


def _functions(text: str) -> dict[str, str]:
    """Function name -> its text (signature and body)."""
    starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(text)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {name: text[s:e] for (s, name), e in zip(starts, ends, strict=True)}


def _kernel_name(line: str) -> str:
    if m := _TRITON_NAME.search(line):
        return m.group(1)
    m = _SCAN_NAME.search(line)
    return m.group(0) if m else "unnamed"


def _kernel_lines(body: str) -> list[str]:
    return [line for line in body.splitlines() if _KERNEL_CALL.search(line)]


def kernel_launches(text: str) -> collections.Counter[str]:
    """Kernel name -> how often the module's `main` launches it (call sites through the call
    graph; a module without control flow around its calls, as a train step)."""
    funcs = _functions(text)

    @functools.cache
    def launches(name: str) -> tuple[tuple[str, int], ...]:
        body = funcs[name]
        count = collections.Counter(_kernel_name(line) for line in _kernel_lines(body))
        for callee in _CALL.findall(body):
            if callee in funcs:
                count.update(dict(launches(callee)))
        return tuple(count.items())

    return collections.Counter(dict(launches("main")))


def distinct_kernels(text: str) -> int:
    """How many different kernels (name and IR) the module holds: each one compiles once."""
    seen = set()
    for line in _kernel_lines(text):
        ir = _IR.search(line)
        seen.add(hashlib.sha1(((ir.group(0) if ir else line) + _kernel_name(line)).encode())
                 .hexdigest())
    return len(seen)


@dataclasses.dataclass(frozen=True)
class ModuleSize:
    """The size of a lowered module: its text, its operations and the kernels' IR within it."""

    bytes: int  # the whole text
    kernel_ir_bytes: int  # the serialized kernels' part of it
    operations: int  # StableHLO/CHLO/func operations, kernels counted once each, no sdy.*
    sharding_annotations: int  # Shardy's `sdy.*` operations (JAX >= 0.11 under a mesh)
    functions: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def module_size(text: str) -> ModuleSize:
    """`ModuleSize` of a lowered module's text. Shardy's annotations are counted apart: JAX
    0.12 lowering under an abstract mesh puts a replicated `sdy.sharding_constraint` after
    most operations (38,738 of 90,371 in tests/test_lowered_step.py's MultiSegMamba step),
    which would hide the program's own growth."""
    ir = sum(len(m.group(0)) for line in _kernel_lines(text) for m in _IR.finditer(line))
    ops = _OP.findall(text)
    sdy = sum(op.startswith("sdy.") for op in ops)
    return ModuleSize(bytes=len(text), kernel_ir_bytes=ir, operations=len(ops) - sdy,
                      sharding_annotations=sdy, functions=len(_FUNC.findall(text)))
