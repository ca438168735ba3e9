"""Worst-case cost and memory of a checked CEL condition, estimated before it ever runs.

cel-expr-python offers no cost limit and no cost estimate: its runtime (cel-cpp) only stops a
single evaluation after 10,000 comprehension iterations in all (``ITERATION_BUDGET``, not
configurable from Python). Within that budget one ~350-character condition that concatenates
strings inside ``map()`` built 4 GB; and ``map()``/``filter()`` copy their result list at every
step, keeping every copy until the evaluation ends (a ``map()`` over 3,200 elements: 0.84 s,
+168 MB). So the estimate here walks the checked AST (the same protobuf ``cel.py`` reads for the
referenced variables) and bounds, for every sub-expression, the largest value it can produce
given the caps on the inputs (``Budget``: strings, map entries), how often it runs (comprehension
bodies: at most ``ITERATION_BUDGET`` times in all) and so what it costs and allocates.

Units (measured on the development machine, x86, cel-expr-python 0.1.3; see
docs/performance.md): one **cost unit** is about one list element copied, 5-50 ns (~30 ns); a node
evaluated costs 1, a comprehension iteration 10, a character copied or compared 1/10, compiling
a regex 300 + 10 per program size unit (cel-cpp compiles it at every call), a regex step (program
size x input character) 1/4. **Memory** is bytes allocated during one evaluation (cel-cpp frees
nothing before the evaluation ends): a string's characters, 32 bytes per list slot, 64 per map
entry.
Both are upper bounds: real evaluations usually cost far less.

``estimate(serialized, variables, budget, regex_check) -> Estimate``; raises ``BudgetError``
(message and 1-based column) for an invalid regex literal, and ``Estimate.check`` for a
condition above its limits, with the construct responsible and what to change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from flux_edge.errors import FluxError
from flux_edge.rules.protobuf import every as pb_every
from flux_edge.rules.protobuf import fields as pb_fields
from flux_edge.rules.protobuf import first as pb_first

__all__ = [
    "DEFAULT_BUDGET",
    "ITERATION_BUDGET",
    "Budget",
    "BudgetError",
    "Estimate",
    "estimate",
    "regex_size",
]

#: cel-cpp's comprehension iteration limit per evaluation (RuntimeOptions default, fixed)
ITERATION_BUDGET: Final = 10_000

NODE: Final = 1.0  # evaluating one node
CHAR: Final = 0.1  # one character copied, compared, scanned
SLOT: Final = 1.0  # one list element or map entry copied or compared
REGEX: Final = 0.25  # one regex step: program size x input characters
REGEX_COMPILE: Final = 300.0  # compiling a regex (RE2, at every call), plus 10 per size unit
ITERATION: Final = 10.0  # one comprehension iteration's own overhead
SLOT_BYTES: Final = 32
ENTRY_BYTES: Final = 64
NUMBER_CHARS: Final = 40  # string(number), string(timestamp), ...


@dataclass(frozen=True, slots=True)
class Budget:
    """What one evaluation of a condition may cost, and the caps on its inputs that make the
    estimate possible (``Condition.evaluate`` refuses larger inputs)."""

    max_cost: int = 50_000  # cost units per evaluation (~1.5 ms on x86, more on a Pi)
    max_memory: int = 4 << 20  # bytes allocated per evaluation
    max_string: int = 1024  # characters of a string input (register, input, map value)
    max_entries: int = 256  # entries of a map input (previous, delta, age)
    max_key: int = 128  # characters of a map input's key (a measurement name)


DEFAULT_BUDGET: Final = Budget()


class BudgetError(FluxError, ValueError):
    """Internal: ``cel.py`` turns it into a ``RuleError`` (message, 1-based column)."""

    def __init__(self, message: str, column: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


class _B(NamedTuple):
    """The worst case of a value: the longest string (characters) and the longest list or
    largest map (entries) it can be, with the bounds of its elements/values (``e``) and map
    keys (``k``). A scalar is all zero. A value of unknown kind joins several."""

    s: int = 0
    n: int = 0
    e: _B | None = None
    k: _B | None = None
    m: int = 0  # what it may be: LIST | MAP (0: neither)


SCALAR: Final = _B()
LIST: Final = 1
MAP: Final = 2


def _join(a: _B | None, b: _B | None) -> _B | None:
    if a is None:
        return b
    if b is None or a == b:
        return a
    return _B(max(a.s, b.s), max(a.n, b.n), _join(a.e, b.e), _join(a.k, b.k), a.m | b.m)


def _bytes(b: _B | None) -> int:
    """Bytes a value of bound ``b`` can hold (deep)."""
    if b is None:
        return 0
    out = b.s
    if b.n:
        out += b.n * (SLOT_BYTES + _bytes(b.e) + _bytes(b.k))
    return out


def _touch(b: _B | None) -> float:
    """Cost of reading a whole value (comparing it, hashing it)."""
    if b is None:
        return 0.0
    out = b.s * CHAR
    if b.n:
        out += b.n * (SLOT + _touch(b.e) + _touch(b.k))
    return out


@dataclass(slots=True)
class _Hot:
    """The construct that contributes most to a limit: what it does and where."""

    amount: float = 0.0
    expr_id: int = 0
    what: str = ""


@dataclass(slots=True)
class Estimate:
    """The worst case of one evaluation."""

    cost: int
    memory: int
    budget: Budget
    hot_cost: _Hot = field(default_factory=_Hot)
    hot_memory: _Hot = field(default_factory=_Hot)
    positions: Mapping[int, int] = field(default_factory=dict)

    def column(self, hot: _Hot) -> int:
        pos = self.positions.get(hot.expr_id)
        return 0 if pos is None else pos + 1

    def check(self) -> None:
        """Raise ``BudgetError`` when the estimate is above the budget."""
        b = self.budget
        if self.memory > b.max_memory:
            hot = self.hot_memory
            raise BudgetError(
                f"condition may allocate up to {format_bytes(self.memory)} in one evaluation; "
                f"the limit is {format_bytes(b.max_memory)}: {hot.what}. Build fewer or shorter "
                "strings and lists (no concatenation inside map/filter/all/exists; compare sizes "
                "instead of building values)",
                self.column(hot),
            )
        if self.cost > b.max_cost:
            hot = self.hot_cost
            raise BudgetError(
                f"condition may cost up to {self.cost:,} units in one evaluation (about "
                f"{self.cost * 30 / 1e6:.1f} ms on a PC, several times that on a Pi); the limit "
                f"is {b.max_cost:,}: {hot.what}. Simplify it (shorter lists, fewer nested "
                "comprehensions, smaller regexes), or raise the rule's max_cost",
                self.column(hot),
            )


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# --- protobuf reading (field numbers: cel/expr/checked.proto, syntax.proto) ---------------------


_sub = pb_first
_subs = pb_every


class _Node:
    """One Expr message, decoded one level: its id, kind (field number) and payload."""

    __slots__ = ("body", "id", "kind")

    def __init__(self, buf: bytes) -> None:
        self.id = 0
        self.kind = 0
        self.body = b""
        for f, v in pb_fields(buf):
            if f == 2 and isinstance(v, int):
                self.id = v
            elif f >= 3 and isinstance(v, bytes):
                self.kind, self.body = f, v


_CONST, _IDENT, _SELECT, _CALL, _LIST, _STRUCT, _COMPREHENSION = 3, 4, 5, 6, 7, 8, 9

_BOOLEAN_OPS: Final = frozenset(
    {
        "_&&_", "_||_", "!_", "@not_strictly_false", "_==_", "_!=_", "_<_", "_<=_", "_>_",
        "_>=_", "contains", "startsWith", "endsWith", "has",
    }
)  # fmt: skip
_SCALAR_FUNCS: Final = frozenset(
    {
        "_-_", "_*_", "_/_", "_%_", "-_", "size", "int", "uint", "double", "bool", "type",
        "timestamp", "duration", "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth",
        "getDate", "getDayOfWeek", "getHours", "getMinutes", "getSeconds", "getMilliseconds",
    }
)  # fmt: skip


# --- regular expressions -------------------------------------------------------------------------


def regex_size(pattern: str) -> int:
    """A rough RE2 program size: literals and classes count 1, ``x{n,m}`` repeats x max(n, m)
    times, ``*``/``+``/``?`` add one, alternatives add up. RE2 caps each count at 1,000."""
    size, _ = _regex_seq(pattern, 0)
    return max(size, 1)


def _regex_seq(p: str, i: int) -> tuple[int, int]:
    total = branch = 0
    last = 0
    n = len(p)
    while i < n:
        c = p[i]
        if c == ")":
            break
        if c == "|":
            total += branch
            branch = last = 0
            i += 1
            continue
        if c == "(":
            inner, i = _regex_seq(p, i + 1)
            i += 1  # the ")"
            last = max(inner, 1)
            branch += last
            continue
        if c == "[":
            j = i + 1
            if j < n and p[j] == "^":
                j += 1
            if j < n and p[j] == "]":
                j += 1
            while j < n and p[j] != "]":
                j += 2 if p[j] == "\\" else 1
            i = j + 1
            last = 1
            branch += 1
            continue
        if c in "*+?":
            branch += 1
            i += 1
            continue
        if c == "{":
            j = p.find("}", i)
            body = p[i + 1 : j] if j > i else ""
            counts = [int(x) for x in body.split(",") if x.strip().isdigit()]
            if j > i and counts:
                times = max(*counts, counts[0] + 1 if body.endswith(",") else 0)
                branch += last * (min(times, 1000) - 1)
                last *= min(times, 1000)
                i = j + 1
                continue
        if c == "\\":
            i += 2
        else:
            i += 1
        last = 1
        branch += 1
    return total + branch, i


# --- the walk ------------------------------------------------------------------------------------


class _Walker:
    def __init__(
        self,
        budget: Budget,
        regex_check: Callable[[str], str | None],
        positions: Mapping[int, int],
    ) -> None:
        self.budget = budget
        self.regex_check = regex_check
        self.positions = positions
        self.cost = 0.0
        self.memory = 0.0
        self.hot_cost = _Hot()
        self.hot_memory = _Hot()
        self.counting = True
        self.depth = 0
        self._cache: dict[tuple[int, tuple[tuple[str, _B], ...]], _B] = {}
        self.regexes_checked: set[str] = set()
        #: accumulator variable -> its largest bound (the step is walked with its average)
        self.accus: dict[str, _B] = {}

    # accounting
    def charge(self, node: _Node, runs: int, cost: float, memory: float, what: str) -> None:
        if not self.counting:
            return
        c = cost * runs
        m = memory * runs
        self.cost += c
        self.memory += m
        times = f", {runs:,} times per evaluation" if runs > 1 else ""
        if c > self.hot_cost.amount:
            self.hot_cost = _Hot(c, node.id, what + times)
        if m > self.hot_memory.amount:
            self.hot_memory = _Hot(m, node.id, what + times)

    def walk(self, buf: bytes, env: dict[str, _B], runs: int) -> _B:
        self.depth += 1
        if self.depth > 200:
            raise BudgetError("condition is too deeply nested to estimate its cost")
        try:
            node = _Node(buf)
            if not self.counting:
                key = (node.id, tuple(sorted(env.items())))
                hit = self._cache.get(key)
                if hit is None:
                    hit = self._cache[key] = self._walk(node, env, runs)
                return hit
            return self._walk(node, env, runs)
        finally:
            self.depth -= 1

    def _walk(self, node: _Node, env: dict[str, _B], runs: int) -> _B:
        kind, body = node.kind, node.body
        if kind == _CONST:
            for f, v in pb_fields(body):
                if f == 6 and isinstance(v, bytes):  # string_value
                    return _B(s=len(v.decode("utf-8", "replace")))
                if f == 7 and isinstance(v, bytes):  # bytes_value
                    return _B(s=len(v))
            return SCALAR
        if kind == _IDENT:
            name = (_sub(body, 1) or b"").decode()
            self.charge(node, runs, NODE, 0, "reading a variable")
            return env.get(name, SCALAR)
        if kind == _SELECT:
            operand = _sub(body, 1)
            test_only = any(f == 3 and v for f, v in pb_fields(body))
            o = self.walk(operand, env, runs) if operand is not None else SCALAR
            self.charge(node, runs, NODE, 0, "a field selection")
            return SCALAR if test_only else (o.e or SCALAR)
        if kind == _CALL:
            return self._call(node, env, runs)
        if kind == _LIST:
            elems = [self.walk(e, env, runs) for e in _subs(body, 1)]
            elem: _B | None = None
            for e in elems:
                elem = _join(elem, e)
            n = len(elems)
            self.charge(node, runs, NODE + n * SLOT, n * SLOT_BYTES, f"a list of {n} elements")
            return _B(n=n, e=elem, m=LIST)
        if kind == _STRUCT:
            if _sub(body, 1):  # message_name: a message, not a map
                for entry in _subs(body, 2):
                    for f, v in pb_fields(entry):
                        if f == 4 and isinstance(v, bytes):
                            self.walk(v, env, runs)
                return SCALAR
            keys: _B | None = None
            values: _B | None = None
            count = 0
            for entry in _subs(body, 2):
                count += 1
                for f, v in pb_fields(entry):
                    if f == 3 and isinstance(v, bytes):
                        keys = _join(keys, self.walk(v, env, runs))
                    elif f == 4 and isinstance(v, bytes):
                        values = _join(values, self.walk(v, env, runs))
            self.charge(
                node, runs, NODE + count * SLOT, count * ENTRY_BYTES, f"a map of {count} entries"
            )
            return _B(n=count, e=values, k=keys, m=MAP)
        if kind == _COMPREHENSION:
            return self._comprehension(node, env, runs)
        return SCALAR

    def _call(self, node: _Node, env: dict[str, _B], runs: int) -> _B:
        body = node.body
        function = (_sub(body, 2) or b"").decode()
        target = _sub(body, 1)
        arg_bufs = ([target] if target is not None else []) + _subs(body, 3)
        args = [self.walk(a, env, runs) for a in arg_bufs]
        if function == "matches":
            return self._matches(node, arg_bufs, args, runs)
        if function in _BOOLEAN_OPS:
            cost = NODE
            if function in ("_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_"):
                cost += min(_touch(a) for a in args) if args else 0
            elif function in ("startsWith", "endsWith"):
                cost += min(a.s for a in args) * CHAR
            elif function == "contains":
                cost += sum(a.s for a in args) * CHAR
            self.charge(node, runs, cost, 0, "a comparison")
            return SCALAR
        if function == "@in":
            needle, hay = [*args, SCALAR, SCALAR][:2]
            if hay.m == MAP:  # a map: one lookup
                cost = NODE + _touch(needle)
            else:
                cost = NODE + hay.n * (SLOT + _touch(_join(needle, hay.e)))
            self.charge(node, runs, cost, 0, f"`in` over up to {hay.n:,} elements")
            return SCALAR
        if function == "_?_:_" and len(args) == 3:
            self.charge(node, runs, NODE, 0, "a conditional")
            return _join(args[1], args[2]) or SCALAR
        if function == "_[_]" and len(args) == 2:
            self.charge(node, runs, NODE + _touch(args[1]), 0, "an index")
            return args[0].e or SCALAR
        if function == "_+_" and len(args) == 2:
            a, b = args
            if not (a.s or b.s or a.n or b.n):
                self.charge(node, runs, NODE, 0, "an addition")
                return SCALAR
            out = _B(a.s + b.s, a.n + b.n, _join(a.e, b.e), _join(a.k, b.k), a.m | b.m)
            accu = next((n for n in map(_accu_name, arg_bufs) if n in self.accus), None)
            if accu is not None:
                what = (
                    f"map()/filter() builds its result one element at a time, copying the "
                    f"list at each step (up to {self.accus[accu].n:,} elements)"
                )
            elif out.n:
                what = f"`+` builds lists of up to {out.n:,} elements"
            else:
                what = f"`+` builds strings of up to {out.s:,} characters"
            self.charge(
                node,
                runs,
                NODE + out.s * CHAR + out.n * SLOT,
                out.s + out.n * SLOT_BYTES,
                what,
            )
            return out
        if function in ("string", "bytes") and len(args) == 1:
            a = args[0]
            s = a.s if a.s else NUMBER_CHARS
            self.charge(node, runs, NODE + s * CHAR, s, f"{function}() of up to {s:,} characters")
            return _B(s=s)
        if function == "dyn" and len(args) == 1:
            return args[0]
        if function in _SCALAR_FUNCS:
            self.charge(node, runs, NODE + sum(a.s for a in args) * CHAR, 0, f"{function}()")
            return SCALAR
        # A function this estimate does not know: assume it may concatenate its arguments.
        out = _B(sum(a.s for a in args), sum(a.n for a in args))
        for a in args:
            out = _B(out.s, out.n, _join(out.e, a.e), _join(out.k, a.k), out.m | a.m)
        self.charge(
            node,
            runs,
            NODE + sum(_touch(a) for a in args),
            _bytes(out),
            f"{function or 'a function'}()",
        )
        return out

    def _matches(self, node: _Node, bufs: list[bytes], args: list[_B], runs: int) -> _B:
        subject = args[0] if args else SCALAR
        literal = _string_literal(bufs[1]) if len(bufs) > 1 else None
        if literal is not None:
            if self.counting and literal not in self.regexes_checked:
                self.regexes_checked.add(literal)
                error = self.regex_check(literal)
                if error is not None:
                    pos = self.positions.get(_Node(bufs[1]).id)
                    raise BudgetError(
                        f"invalid regular expression {literal!r}: {error}",
                        0 if pos is None else pos + 1,
                    )
            size = regex_size(literal)
            what = (
                f"matches() runs a regex of size ~{size:,} over strings of up to "
                f"{subject.s:,} characters (it is compiled at every evaluation)"
            )
        else:
            size = args[1].s if len(args) > 1 else 0
            what = (
                f"matches() compiles a pattern of up to {size:,} characters at every "
                "evaluation (write the pattern as a string literal)"
            )
        cost = REGEX_COMPILE + 10 * size + REGEX * (size + 1) * (subject.s + 1)
        self.charge(node, runs, cost, size * SLOT_BYTES, what)
        return SCALAR

    def _comprehension(self, node: _Node, env: dict[str, _B], runs: int) -> _B:
        parts: dict[int, bytes] = {}
        for f, v in pb_fields(node.body):
            if isinstance(v, bytes):
                parts[f] = v
        iter_var = parts.get(1, b"").decode()
        iter_var2 = parts.get(8, b"").decode()
        accu_var = parts.get(3, b"").decode()
        rng = self.walk(parts[2], env, runs) if 2 in parts else SCALAR
        init = self.walk(parts[4], env, runs) if 4 in parts else SCALAR
        n = min(rng.n, ITERATION_BUDGET)
        body_runs = min(runs * n, ITERATION_BUDGET)
        loop_env = dict(env)
        if iter_var2:  # (index or key, value)
            loop_env[iter_var] = rng.k or SCALAR
            loop_env[iter_var2] = rng.e or SCALAR
        elif rng.m == MAP:  # a map's keys
            loop_env[iter_var] = rng.k or SCALAR
        elif rng.m == LIST:
            loop_env[iter_var] = rng.e or SCALAR
        else:  # cannot tell: either
            loop_env[iter_var] = _join(rng.e, rng.k) or SCALAR

        step = parts.get(6)
        final, average = init, init
        if step is not None and n:
            was = self.counting
            self.counting = False
            try:
                a1 = self._step(step, loop_env, accu_var, init)
                a2 = self._step(step, loop_env, accu_var, _join(init, a1) or init)
                a3 = self._step(step, loop_env, accu_var, _join(a1, a2) or a2)
            finally:
                self.counting = was
            ds, dn = max(a1.s - init.s, 0), max(a1.n - init.n, 0)
            if a2.s - a1.s > ds or a2.n - a1.n > dn or a3.s - a2.s > ds or a3.n - a2.n > dn:
                raise BudgetError(
                    "a comprehension's result grows faster than one element per step, so its "
                    "size cannot be bounded",
                    self._column(node),
                )
            inner = _join(a2.e, a3.e)
            keys = _join(a2.k, a3.k)
            final = _B(init.s + n * ds, init.n + n * dn, inner, keys, a3.m)
            average = _B(init.s + (n * ds) // 2, init.n + (n * dn) // 2, inner, keys, a3.m)
        self.charge(node, runs, NODE, 0, "a comprehension")
        if body_runs:
            self.charge(node, body_runs, ITERATION, 0, f"a comprehension over up to {n:,} elements")
        outer = self.accus.get(accu_var)
        self.accus[accu_var] = final
        if 5 in parts:
            self.walk(parts[5], {**loop_env, accu_var: average}, body_runs)
        if step is not None:
            # the sum over the steps of a cost linear in the accumulator's size
            self.walk(step, {**loop_env, accu_var: average}, body_runs)
        if outer is None:
            del self.accus[accu_var]
        else:
            self.accus[accu_var] = outer
        if 7 in parts:
            return self.walk(parts[7], {**env, accu_var: final}, runs)
        return final

    def _step(self, step: bytes, env: dict[str, _B], accu_var: str, accu: _B) -> _B:
        return self.walk(step, {**env, accu_var: accu}, 1)

    def _column(self, node: _Node) -> int:
        pos = self.positions.get(node.id)
        return 0 if pos is None else pos + 1


def _accu_name(buf: bytes) -> str:
    node = _Node(buf)
    return (_sub(node.body, 1) or b"").decode() if node.kind == _IDENT else ""



def _string_literal(buf: bytes) -> str | None:
    node = _Node(buf)
    if node.kind != _CONST:
        return None
    v = _sub(node.body, 6)
    return None if v is None else v.decode("utf-8", "replace")


def _input_bound(type_: str, budget: Budget) -> _B:
    text = _B(s=budget.max_string)
    key = _B(s=budget.max_key)
    if type_ == "string":
        return text
    if type_ == "map(dyn)":
        return _B(n=budget.max_entries, e=text, k=key, m=MAP)
    if type_.startswith("map("):
        return _B(n=budget.max_entries, e=SCALAR, k=key, m=MAP)
    return SCALAR


def _positions(checked: bytes) -> dict[int, int]:
    out: dict[int, int] = {}
    info = _sub(checked, 5)
    if info is None:
        return out
    for entry in _subs(info, 4):
        key = value = None
        for f, v in pb_fields(entry):
            if f == 1 and isinstance(v, int):
                key = v
            elif f == 2 and isinstance(v, int):
                value = v if v < 1 << 31 else v - (1 << 64)
        if key is not None and value is not None and value >= 0:
            out[key] = value
    return out


def estimate(
    serialized: bytes,
    variables: Mapping[str, str],
    budget: Budget = DEFAULT_BUDGET,
    regex_check: Callable[[str], str | None] = lambda _pattern: None,
) -> Estimate:
    """The worst case of one evaluation of a checked expression (``Expression.serialize()``: a
    google.protobuf.Any holding a cel.expr.CheckedExpr). ``regex_check(pattern)`` returns the
    error of an invalid regex literal (None when it compiles). Raises ``BudgetError`` for an
    invalid regex literal or a construct whose size cannot be bounded; ``ValueError`` for an
    unreadable AST."""
    checked = _sub(serialized, 2)  # Any.value: the CheckedExpr
    expr = _sub(checked, 4) if checked is not None else None
    if checked is None or expr is None:
        raise ValueError("not a checked expression")
    positions = _positions(checked)
    walker = _Walker(budget, regex_check, positions)
    env = {name: _input_bound(t, budget) for name, t in variables.items()}
    walker.walk(expr, env, 1)
    return Estimate(
        cost=int(walker.cost + 0.999),
        memory=int(walker.memory),
        budget=budget,
        hot_cost=walker.hot_cost,
        hot_memory=walker.hot_memory,
        positions=positions,
    )
