"""Traces an update rule into a short program of elementwise instructions, for the fused kernels.

The rule (for example ``longmem.ademamix._ademamix_rule``) stays the single statement of the math:
run with :class:`Tracer` as its ``ops`` object, each operation is recorded instead of executed,
with the scalars the rule computed in Python for this step. The fused kernels then execute the
recorded program over small blocks of each tensor, so every element is read and written once per
step, while performing the same float32 operations in the same order as the foreach path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Instruction codes, shared with longmem_ops.h (LM_OPS) and the Triton code generator (cuda.py).
OP_NAMES = (
    "mul_s", "mul", "add_s", "axpy", "sub", "addcmul", "addcdiv", "div_s",
    "div", "sqrt", "recip", "abs", "sigmoid", "min", "copy", "neg", "lerp_lo", "lerp_hi",
)  # fmt: skip
(MUL_S, MUL, ADD_S, AXPY, SUB, ADDCMUL, ADDCDIV, DIV_S,
 DIV, SQRT, RECIP, ABS, SIGMOID, MIN, COPY, NEG, LERP_LO, LERP_HI) = range(len(OP_NAMES))  # fmt: skip

#: slots: 0 the parameter (working precision), 1 the gradient, 2... the state buffers, then temporaries
PARAM, GRAD = 0, 1
MAX_SLOTS = 16  # as in longmem_cpu.c


def _as_float32(x: float) -> float:
    """``x`` rounded to float32, as the kernels round each scalar."""
    return struct.unpack("f", struct.pack("f", x))[0]


class TraceError(RuntimeError):
    """The rule did something the fused kernels cannot express."""


class Value:
    """A symbolic tensor: a slot of the program."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot

    def __repr__(self) -> str:
        return f"Value({self.slot})"


@dataclass
class Program:
    """A traced rule: ``code`` rows are ``(op, d, a, b, c)`` over slots, one scalar per row."""

    buffers: tuple[str, ...]
    code: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    scalars: list[float] = field(default_factory=list)
    n_temp: int = 0

    @property
    def n_mem(self) -> int:
        """Slots backed by memory: parameter, gradient and state buffers."""
        return 2 + len(self.buffers)

    def signature(self) -> tuple[Any, ...]:
        """Everything but the scalars: programs with equal signatures compile to the same kernel."""
        return (len(self.buffers), self.n_temp, tuple(self.code))

    def written(self) -> list[int]:
        """The memory slots (parameter, state buffers) the program writes, in slot order."""
        return sorted({row[1] for row in self.code if row[1] < self.n_mem})

    def __str__(self) -> str:
        names = ["p", "g", *self.buffers] + [f"t{i}" for i in range(self.n_temp)]
        lines = []
        for (op, d, a, b, c), s in zip(self.code, self.scalars, strict=True):
            lines.append(f"{names[d]} = {OP_NAMES[op]}({names[a]}, {names[b]}, {names[c]}, {s!r})")
        return "\n".join(lines)


class Tracer:
    """An ``ops`` object (see ``longmem._elementwise.TensorOps``) that records instead of computing."""

    def __init__(self, buffers: Sequence[str]) -> None:
        self.program = Program(tuple(buffers))

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _new(self) -> Value:
        slot = self.program.n_mem + self.program.n_temp
        if slot >= MAX_SLOTS:
            raise TraceError(f"the rule needs more than {MAX_SLOTS} tensors at once")
        self.program.n_temp += 1
        return Value(slot)

    def _emit(self, op: int, d: Value, a: Value, b: Value | None = None, c: Value | None = None,
              s: float = 0.0) -> None:  # fmt: skip
        for x in (d, a, b, c):
            if x is not None and not isinstance(x, Value):
                raise TraceError(f"{OP_NAMES[op]}: expected a traced tensor, got {type(x).__name__}")
        if d.slot == GRAD:
            # The gradient is the caller's .grad; the foreach path never writes it either.
            raise TraceError("the rule writes into the gradient")
        slots = (d.slot, a.slot, (b or a).slot, (c or a).slot)
        self.program.code.append((op, *slots))
        self.program.scalars.append(float(s))

    @staticmethod
    def _is_value(y: Any) -> bool:
        return isinstance(y, Value)

    # ---- the operations of TensorOps/ListOps -------------------------------------------------
    def mul_(self, x: Value, y: float | Value) -> None:
        if self._is_value(y):
            self._emit(MUL, x, x, y)  # type: ignore[arg-type]
        else:
            self._emit(MUL_S, x, x, s=y)  # type: ignore[arg-type]

    def mul(self, x: Value, y: Value) -> Value:
        out = self._new()
        self._emit(MUL, out, x, y)
        return out

    def add_(self, x: Value, y: Value, alpha: float = 1.0) -> None:
        self._emit(AXPY, x, x, y, s=alpha)

    def add(self, x: Value, y: Value, alpha: float = 1.0) -> Value:
        out = self._new()
        self._emit(AXPY, out, x, y, s=alpha)
        return out

    def add_scalar_(self, x: Value, value: float) -> None:
        self._emit(ADD_S, x, x, s=value)

    def sub(self, x: Value, y: Value) -> Value:
        out = self._new()
        self._emit(SUB, out, x, y)
        return out

    def sub_(self, x: Value, y: Value) -> None:
        self._emit(SUB, x, x, y)

    def addcmul_(self, x: Value, a: Value, b: Value, value: float) -> None:
        self._emit(ADDCMUL, x, x, a, b, s=value)

    def addcdiv_(self, x: Value, a: Value, b: Value, value: float) -> None:
        self._emit(ADDCDIV, x, x, a, b, s=value)

    def div_(self, x: Value, y: float | Value) -> None:
        if self._is_value(y):
            self._emit(DIV, x, x, y)  # type: ignore[arg-type]
        else:
            self._emit(DIV_S, x, x, s=y)  # type: ignore[arg-type]

    def div(self, x: Value, y: float) -> Value:
        out = self._new()
        if self._is_value(y):
            self._emit(DIV, out, x, y)  # type: ignore[arg-type]
        else:
            self._emit(DIV_S, out, x, s=y)
        return out

    def sqrt(self, x: Value) -> Value:
        out = self._new()
        self._emit(SQRT, out, x)
        return out

    def reciprocal_(self, x: Value) -> None:
        self._emit(RECIP, x, x)

    def abs_(self, x: Value) -> None:
        self._emit(ABS, x, x)

    def sigmoid_(self, x: Value) -> None:
        self._emit(SIGMOID, x, x)

    def minimum_(self, x: Value, y: Value) -> None:
        self._emit(MIN, x, x, y)

    def copy_(self, x: Value, y: Value) -> None:
        self._emit(COPY, x, y)

    def lerp_(self, x: Value, y: Value, weight: float) -> None:
        # torch's lerp takes one of two formulas by |weight| < 0.5 (see longmem_ops.h). The weight
        # is one scalar for the whole step, so the choice is made here, once, on the float32 value
        # the kernels will use: a per-element branch on it keeps compilers from vectorizing.
        small = abs(_as_float32(weight)) < 0.5
        self._emit(LERP_LO if small else LERP_HI, x, x, y, s=weight)

    def clone(self, x: Value) -> Value:
        out = self._new()
        self._emit(COPY, out, x)
        return out


def trace(rule: Callable[..., None], t: float, buffers: Sequence[str], absent: Sequence[str]) -> Program:
    """The program ``rule`` runs at step ``t``, with ``buffers`` kept and ``absent`` ones None."""
    tracer = Tracer(buffers)
    state = {name: Value(2 + i) for i, name in enumerate(buffers)}
    rule(tracer, t, Value(PARAM), Value(GRAD), **state, **dict.fromkeys(absent))
    return tracer.program
