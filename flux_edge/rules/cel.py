"""CEL conditions: the ONLY module that imports cel-expr-python.

``compile_condition(rule, expr, variables) -> Condition`` type-checks a rule's ``when`` expression
against the variables the rule may use and returns a compiled, reusable ``Condition``.

How it is compiled (facts measured on cel-expr-python 0.1.3):

* **Checking** happens in an environment that declares the variables plus extra overloads of the
  comparison operators (``<``, ``<=``, ``>``, ``>=``, ``==``, ``!=``) and ``in`` for mixed
  double/int/uint operands, so ``temperature > 80`` (a double compared with an int literal) passes
  the checker, while ``temperature > "80"`` is still rejected at load time.
* **Evaluation** happens in one plain environment: the checked expression is serialized and
  deserialized there, and CEL's own runtime compares mixed numbers (heterogeneous numeric
  comparison and equality). Evaluating in the checking environment fails (its overloads clash
  with the runtime's built-ins). The runtime does not check values against the declared types,
  so ``Condition.evaluate`` does. Arithmetic is not widened: ``temperature + 1`` stays a type
  error, and the message says to write ``1.0``.
* **Hostile input** is refused before CEL sees it: longer than ``MAX_EXPRESSION_CHARS`` or brackets
  nested deeper than ``MAX_NESTING``. CEL's own limits (parser recursion 32, 100k code points,
  comprehension iteration budget) still apply and surface as ``RuleError``, never as a crash.
* **Budgets.** The library has no cost limit, so ``compile_condition`` estimates each condition's
  worst-case cost and memory per evaluation (``flux_edge.rules.cost``, from the checked AST and
  the input caps of a ``Budget``) and refuses one above its budget, naming the construct and its
  column; regex literals are compiled then (RE2, through CEL), so an invalid one is refused at
  load time. ``Condition.evaluate`` refuses inputs above the caps (strings longer than
  ``Budget.max_string``, maps with more than ``Budget.max_entries`` entries), which is what makes
  the estimate an upper bound.
* **Evaluation errors** of every kind (a CEL error value, an exception from the library,
  ``MemoryError``/``std::bad_alloc``, a wrong or too large input) are raised as
  ``EvaluationError`` (a ``RuleError``) with a ``reason`` from ``ERROR_REASONS``: nothing else
  escapes ``evaluate``.

Errors are ``RuleError(rule, message, column)``: one clean line (``found no matching overload for
'_>_' applied to '(double, string)'``), ``column`` the 1-based character offset of the caret within
the expression (for a one-line expression: its column), 0 when unknown.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from cel_expr_python import cel

from flux_edge.errors import RuleError
from flux_edge.rules.cost import DEFAULT_BUDGET, Budget, BudgetError, Estimate, estimate
from flux_edge.rules.protobuf import fields as pb_fields
from flux_edge.rules.protobuf import first as pb_first

__all__ = [
    "DEFAULT_BUDGET",
    "ERROR_REASONS",
    "MAP_TYPES",
    "MAX_EXPRESSION_CHARS",
    "MAX_NESTING",
    "VARIABLE_TYPES",
    "Budget",
    "Condition",
    "EvaluationError",
    "compile_condition",
]

MAX_EXPRESSION_CHARS: Final = 4096
MAX_NESTING: Final = 24  # brackets; CEL's parser gives up at 32 levels of recursion

#: scalar types, plus the two map types of the engine's ``previous`` (any value per name) and
#: ``delta``/``age`` (a double per name) variables
VARIABLE_TYPES: Final = ("bool", "int", "double", "string", "map(dyn)", "map(double)")
MAP_TYPES: Final = ("map(dyn)", "map(double)")

#: why an evaluation failed (a small fixed set: metrics label it)
ERROR_REASONS: Final = (
    "missing",  # no value for a variable the condition reads
    "type",  # a value of the wrong type
    "too_large",  # an input above the budget's caps (string length, map entries)
    "iterations",  # CEL's comprehension iteration budget (10,000 per evaluation) ran out
    "memory",  # MemoryError / std::bad_alloc
    "runtime",  # a CEL evaluation error: division by zero, no such key, bad regex, overflow
    "internal",  # any other exception from the CEL library
)


class EvaluationError(RuleError):
    """A condition's evaluation failed; ``reason`` is one of ``ERROR_REASONS``."""

    def __init__(self, rule: str, message: str, reason: str) -> None:
        super().__init__(rule, f"evaluation failed: {message}")
        self.reason = reason


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IDENT_FULL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# "ERROR: <input>:LINE:COL: message" (the caret snippet follows on the next lines)
_CEL_ERROR = re.compile(r"ERROR: <input>:(-?\d+):(-?\d+): ([^\n]*)")
_STATUS = re.compile(r"^[A-Z_]+: ")
_STATUS_TAIL = re.compile(r" \[[A-Z_]+\]$")


# --- environments --------------------------------------------------------------------------------


def _cel_type(name: str) -> Any:
    T = cel.Type
    if name == "map(dyn)":
        return T.Map(T.STRING, T.DYN)
    if name == "map(double)":
        return T.Map(T.STRING, T.DOUBLE)
    return {"bool": T.BOOL, "int": T.INT, "double": T.DOUBLE, "string": T.STRING}[name]


def _numeric_comparisons() -> Any:
    """Checker-only overloads so mixed double/int/uint operands type-check.

    The ids follow cel-spec's naming for heterogeneous comparisons (``greater_double_int64``).
    They are only declarations: evaluation runs in a plain environment whose runtime already
    implements these comparisons.
    """
    T = cel.Type
    nums = ((T.DOUBLE, "double"), (T.INT, "int64"), (T.UINT, "uint64"))
    ops = {
        "_<_": "less",
        "_<=_": "less_equals",
        "_>_": "greater",
        "_>=_": "greater_equals",
        "_==_": "equals",
        "_!=_": "not_equals",
    }
    decls = []
    for op, stem in ops.items():
        overloads = [
            cel.Overload(f"{stem}_{an}_{bn}", T.BOOL, [a, b])
            for a, an in nums
            for b, bn in nums
            if an != bn
        ]
        decls.append(cel.FunctionDecl(op, overloads))
    decls.append(
        cel.FunctionDecl(
            "@in",
            [
                cel.Overload(f"in_list_{an}_{bn}", T.BOOL, [a, T.List(b)])
                for a, an in nums
                for b, bn in nums
                if an != bn
            ],
        )
    )
    return cel.CelExtension("flux_numeric_comparisons", decls)


@functools.lru_cache(maxsize=128)
def _checker(variables: frozenset[tuple[str, str]]) -> Any:
    """The checking environment for one set of (name, type) declarations.

    Rules of the same device share a variable set, so a config needs only a handful of these.
    """
    decls = {name: _cel_type(type_) for name, type_ in variables}
    return cel.NewEnv(variables=decls, extensions=[_numeric_comparisons()])


@functools.lru_cache(maxsize=1)
def _runtime() -> Any:
    """The one evaluation environment. It needs no declarations: a checked expression carries its
    own types, and ``Condition.evaluate`` checks the values' types itself (CEL's runtime does not
    after deserialization: it would compare a string with a number as simply not equal)."""
    return cel.NewEnv()


@functools.lru_cache(maxsize=1)
def _regex_probe() -> Any:
    """``"".matches(p)``: compiling a pattern the way the runtime does (RE2)."""
    env = cel.NewEnv(variables={"p": cel.Type.STRING})
    return env.compile('"".matches(p)')


def _regex_error(pattern: str) -> str | None:
    """RE2's complaint about ``pattern`` (None when it compiles)."""
    try:
        result = _regex_probe().eval(data={"p": pattern}).value()
    except Exception as exc:  # noqa: BLE001 - the library's error for a bad pattern, any class
        return _clean_status(str(exc)).removeprefix("invalid regular expression: ")
    if isinstance(result, bool):
        return None
    return _clean_status(str(result)).removeprefix("invalid regular expression: ")


# --- the compiled condition ---------------------------------------------------------------------


_PY_TYPES: Final = {
    "bool": bool,
    "int": int,
    "double": float,
    "string": str,
    "map(dyn)": dict,
    "map(double)": dict,
}
_MISSING: Final = object()


class Condition:
    """A compiled, type-checked boolean expression. Cheap to evaluate (a few µs)."""

    __slots__ = (
        "_cap",
        "_checks",
        "_maps",
        "_program",
        "_strings",
        "budget",
        "cost",
        "expression",
        "fields",
        "memory",
        "rule",
        "types",
        "variables",
    )

    def __init__(
        self,
        rule: str,
        expression: str,
        program: Any,
        variables: frozenset[str],
        types: Mapping[str, str],
        *,
        fields: Mapping[str, frozenset[str] | None] | None = None,
        budget: Budget = DEFAULT_BUDGET,
        cost: Estimate | None = None,
    ) -> None:
        self.rule = rule
        self.expression = expression
        self._program = program
        #: the declared variables the expression references (comprehension variables excluded)
        self.variables = variables
        #: for each referenced map variable: the keys it is read with as ``map.key``, or None when
        #: it is also used otherwise (``m["k"]``, ``"k" in m``, ``m.size()``: any key may count)
        self.fields: Mapping[str, frozenset[str] | None] = fields or {}
        #: the declared type of every variable in ``variables``
        self.types: Mapping[str, str] = {n: types[n] for n in sorted(variables)}
        self._checks = tuple((n, _PY_TYPES[t]) for n, t in self.types.items())
        #: the budget the condition was checked against; its input caps apply at evaluation
        self.budget = budget
        #: estimated worst-case cost units and bytes allocated per evaluation
        self.cost = cost.cost if cost is not None else 0
        self.memory = cost.memory if cost is not None else 0
        self._strings = tuple(n for n, t in self.types.items() if t == "string")
        # (map, values may be strings, the keys it is read with or None: any key)
        self._maps = tuple(
            (n, t == "map(dyn)", self.fields.get(n))
            for n, t in self.types.items()
            if t in MAP_TYPES
        )
        self._cap = budget.max_string

    def __repr__(self) -> str:
        return f"Condition(rule={self.rule!r}, expression={self.expression!r})"

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Evaluate against ``values`` (at least every name in ``variables``).

        An int (or bool) given for a double variable is converted. Raises ``EvaluationError``
        (a ``RuleError`` with a ``reason``) when a value is missing, of the wrong type or above
        the budget's caps, or the evaluation fails in any way (division by zero, CEL's iteration
        budget, an exception from the library, MemoryError): the caller decides what that means.
        Nothing else escapes.
        """
        data = values
        converted: dict[str, Any] | None = None
        for name, want in self._checks:
            v = values.get(name, _MISSING)
            got = type(v)
            if got is want:
                continue
            if want is float and (got is int or got is bool):
                if converted is None:
                    data = converted = dict(values)
                converted[name] = float(v)
            elif v is _MISSING:
                raise EvaluationError(self.rule, f"no value for {name!r}", "missing")
            else:
                raise EvaluationError(
                    self.rule,
                    f"{name!r} is {got.__name__} {v!r:.40}, expected {self.types[name]}",
                    "type",
                )
        if self._strings:
            cap = self._cap
            for name in self._strings:
                if len(data[name]) > cap:
                    raise self._too_long(name, data[name])
        if self._maps:
            self._check_maps(data)
        try:
            result = self._program.eval(data=data).value()
        except MemoryError as exc:
            raise EvaluationError(self.rule, f"out of memory ({exc})", "memory") from None
        except Exception as exc:  # noqa: BLE001 - whatever the library raises stops here
            message = _clean_status(str(exc)).replace("\n", " ")
            reason = _reason(message, exc)
            raise EvaluationError(self.rule, message, reason) from None
        if result is True:
            return True
        if result is False:
            return False
        # CEL returns evaluation errors as an error value whose .value() is the message.
        try:
            message = _clean_status(str(result)).replace("\n", " ")
        except Exception:  # noqa: BLE001 - a value that cannot even be shown
            message = "unreadable result"
        raise EvaluationError(self.rule, message, _reason(message, None))

    def _too_long(self, name: str, v: str) -> EvaluationError:
        return EvaluationError(
            self.rule,
            f"{name} is {len(v):,} characters long; the limit is {self._cap:,}",
            "too_large",
        )

    def _check_maps(self, data: Mapping[str, Any]) -> None:
        """Map inputs within the caps. A map read only as ``map.key`` costs nothing per entry
        (only those keys are looked up): then only their values are checked."""
        cap = self._cap
        for name, dyn, keys in self._maps:
            m = data[name]
            if keys is not None:
                if dyn:
                    for k in keys:
                        v = m.get(k)
                        if type(v) is str and len(v) > cap:
                            raise self._too_long(f"{name}.{k}", v)
                continue
            if len(m) > self.budget.max_entries:
                raise EvaluationError(
                    self.rule,
                    f"{name!r} has {len(m):,} entries; the limit is {self.budget.max_entries:,}",
                    "too_large",
                )
            if not m:
                continue
            key_cap = self.budget.max_key
            longest = max(map(len, m))
            if longest > key_cap:
                raise EvaluationError(
                    self.rule,
                    f"{name} has a key of {longest:,} characters; the limit is {key_cap:,}",
                    "too_large",
                )
            if dyn:
                for k, v in m.items():
                    if type(v) is str and len(v) > cap:
                        raise self._too_long(f"{name}[{k[:40]!r}]", v)


def _reason(message: str, exc: BaseException | None) -> str:
    if "Iteration budget" in message:
        return "iterations"
    if "bad_alloc" in message:
        return "memory"
    if exc is None or isinstance(exc, (RuntimeError, TypeError, ValueError, OverflowError)):
        return "runtime"
    return "internal"


# --- compiling ----------------------------------------------------------------------------------


def compile_condition(
    rule: str, expr: str, variables: Mapping[str, str], *, budget: Budget = DEFAULT_BUDGET
) -> Condition:
    """Type-check ``expr`` against ``variables`` (name -> "bool" | "int" | "double" | "string").

    Raises ``RuleError`` (with the 1-based column when known) if the expression is too long or
    too deeply nested, does not parse, uses an undeclared name, mixes incompatible types, is
    not a bool expression, has an invalid regex literal, or may cost or allocate more than
    ``budget`` allows in one evaluation (worst case, given the budget's input caps).
    """
    for name, type_ in variables.items():
        if not _IDENT_FULL.match(name):
            raise RuleError(rule, f"variable name {name!r} is not a CEL identifier")
        if type_ not in VARIABLE_TYPES:
            raise RuleError(
                rule,
                f"variable {name!r} has unknown type {type_!r}; use one of "
                + ", ".join(VARIABLE_TYPES),
            )
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise RuleError(
            rule,
            f"condition is {len(expr)} characters long; the limit is {MAX_EXPRESSION_CHARS}",
        )
    if not expr.strip():
        raise RuleError(rule, "condition is empty")
    try:
        expr.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RuleError(rule, "condition is not valid Unicode text", exc.start + 1) from None
    code = _blank_strings(expr)
    depth, where = _max_nesting(code, MAX_NESTING)
    if depth > MAX_NESTING:
        raise RuleError(
            rule,
            f"condition nests brackets {depth} levels deep; the limit is {MAX_NESTING}",
            where,
        )

    try:
        checked = _checker(frozenset(variables.items())).compile(expr)
        result_type = checked.return_type().name()
        serialized = checked.serialize()
        program = _runtime().deserialize(serialized)
    except RuntimeError as exc:
        message, column = _clean_compile_error(str(exc), expr)
        raise RuleError(rule, message, column) from None
    if result_type != "BOOL":
        raise RuleError(rule, f"condition must be a bool expression, got {_type_name(result_type)}")
    try:
        cost = estimate(serialized, variables, budget, _regex_error)
        cost.check()
    except BudgetError as exc:
        raise RuleError(rule, exc.message, exc.column) from None
    except (ValueError, RecursionError):
        raise RuleError(
            rule, "cannot read the checked condition to estimate its cost (a new CEL version?)"
        ) from None
    maps = frozenset(n for n, t in variables.items() if t in MAP_TYPES)
    fields: dict[str, set[str] | None] = {}
    try:
        used = _referenced_variables(serialized, variables.keys(), maps, fields)
    except ValueError:
        # Unreadable checked AST (a changed serialization?): fall back to the source text.
        used = frozenset(m.group() for m in _IDENT.finditer(code)) & variables.keys()
        fields = dict.fromkeys(used & maps)
    frozen = {n: (None if f is None else frozenset(f)) for n, f in fields.items() if n in used}
    return Condition(
        rule, expr, program, used, variables, fields=frozen, budget=budget, cost=cost
    )


def _type_name(cel_name: str) -> str:
    return cel_name.lower()


def _clean_status(text: str) -> str:
    """'INVALID_ARGUMENT: divide by zero [INVALID_ARGUMENT]' -> 'divide by zero'."""
    text = _STATUS_TAIL.sub("", text.strip())
    return _STATUS.sub("", text, count=1)


def _clean_compile_error(text: str, expr: str) -> tuple[str, int]:
    """One clean line and the 1-based column from a CEL compile error."""
    if "recursion" in text:
        return (
            "condition is too deeply nested or has too long a chain of operators "
            "(CEL's parser stops at 32 levels)",
            0,
        )
    m = _CEL_ERROR.search(text)
    if m is None:
        return _clean_status(text).replace("\n", " "), 0
    line, col, message = int(m.group(1)), int(m.group(2)), m.group(3).strip()
    message = _STATUS_TAIL.sub("", message).replace(" (in container '')", "")
    if "applied to '(double, int)'" in message or "applied to '(int, double)'" in message:
        message += " (write a double literal such as 80.0, or convert with double(...))"
    more = len(_CEL_ERROR.findall(text)) - 1
    if more > 0:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return message, _offset(expr, line, col)


def _offset(expr: str, line: int, col: int) -> int:
    """CEL's (line, column), both 1-based in code points, -> 1-based offset in ``expr``."""
    if line < 1 or col < 1:
        return 0
    start = 0
    for _ in range(line - 1):
        nl = expr.find("\n", start)
        if nl < 0:
            return 0
        start = nl + 1
    return start + col


# --- source scanning (before CEL sees the text) --------------------------------------------------


def _blank_strings(expr: str) -> str:
    """``expr`` with the contents of string and bytes literals replaced by spaces.

    Same length, so offsets still match. Handles '...', "...", triple quotes, escapes, and raw
    (r"...") literals. An unterminated literal blanks the rest of the text.
    """
    out = list(expr)
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c not in "\"'":
            i += 1
            continue
        # prefix letters (r, b, rb, br in any case) directly before the quote
        j = i
        while j > 0 and i - j < 2 and expr[j - 1] in "rRbB":
            j -= 1
        raw = j < i and (j == 0 or not (expr[j - 1].isalnum() or expr[j - 1] == "_"))
        raw = raw and "r" in expr[j:i].lower()
        quote = expr[i : i + 3] if expr[i : i + 3] in ('"""', "'''") else c
        k = i + len(quote)
        while k < n:
            if not raw and expr[k] == "\\":
                k += 2
                continue
            if expr.startswith(quote, k):
                break
            k += 1
        end = min(k, n)
        for p in range(i + len(quote), end):
            out[p] = " "
        i = end + len(quote)
    return "".join(out)


def _max_nesting(code: str, limit: int) -> tuple[int, int]:
    """(deepest bracket nesting, 1-based offset of the first bracket beyond ``limit``, or 0)."""
    depth = best = where = 0
    for i, c in enumerate(code):
        if c in "([{":
            depth += 1
            if depth > best:
                best = depth
                if depth == limit + 1:
                    where = i + 1
        elif c in ")]}":
            depth -= 1
    return best, where


# --- reading the checked AST ---------------------------------------------------------------------
#
# ``Expression.serialize()`` returns a google.protobuf.Any holding a cel.expr.CheckedExpr. Reading
# its ``expr`` tree tells which declared variables are really referenced; the reference map alone
# does not, because it also lists comprehension variables (``[1, 2].exists(x, x > 1)``), which may
# shadow a declared name. Field numbers are from cel/expr/checked.proto and syntax.proto.

_ANY_VALUE = 2
_CHECKED_EXPR = 4
_EXPR_IDENT, _EXPR_STRUCT, _EXPR_COMPREHENSION = 4, 8, 9
# Expr field -> the fields of that message holding sub-expressions:
# select (operand = 1), call (target = 1, args = 3), list (elements = 1)
_CHILDREN: dict[int, tuple[int, ...]] = {5: (1,), 6: (1, 3), 7: (1,)}


def _sub(buf: bytes, field: int) -> bytes:
    found = pb_first(buf, field)
    if found is None:
        raise ValueError(f"field {field} missing")
    return found


def _select_of_map(
    select: bytes, maps: frozenset[str], bound: frozenset[str]
) -> tuple[str, str] | None:
    """(map variable, key) when a Select node reads ``map.key`` of a declared map variable."""
    operand = field_name = None
    for f, v in pb_fields(select):
        if f == 1 and isinstance(v, bytes):
            operand = v
        elif f == 2 and isinstance(v, bytes):
            field_name = v.decode()
        elif f == 3 and v:  # has(map.key): a test, not a read of the value
            return None
    if operand is None or field_name is None:
        return None
    for f, v in pb_fields(operand):
        if f == _EXPR_IDENT and isinstance(v, bytes):
            name = _sub(v, 1).decode()
            if name in maps and name not in bound:
                return name, field_name
    return None


def _referenced_variables(
    serialized: bytes,
    declared: Any,
    maps: frozenset[str] = frozenset(),
    fields: dict[str, set[str] | None] | None = None,
) -> frozenset[str]:
    """Declared names the checked expression reads, not counting comprehension variables.

    For the map variables in ``maps``, ``fields`` receives the keys read as ``map.key`` (None
    for a map also used any other way)."""
    expr = _sub(_sub(serialized, _ANY_VALUE), _CHECKED_EXPR)
    found: set[str] = set()
    keys: dict[str, set[str] | None] = {} if fields is None else fields
    stack: list[tuple[bytes, frozenset[str]]] = [(expr, frozenset())]
    while stack:
        node, bound = stack.pop()
        for field, value in pb_fields(node):
            if not isinstance(value, bytes):
                continue
            if field == _EXPR_IDENT:
                name = _sub(value, 1).decode()
                if name not in bound and name in declared:
                    found.add(name)
                    if name in maps:
                        keys[name] = None
            elif field == 5 and maps and (hit := _select_of_map(value, maps, bound)):
                name, key = hit
                found.add(name)
                known = keys.setdefault(name, set())
                if known is not None:
                    known.add(key)
            elif field in _CHILDREN:  # select, call, list: sub-expressions at known fields
                children = _CHILDREN[field]
                stack.extend(
                    (v, bound)
                    for f, v in pb_fields(value)
                    if f in children and isinstance(v, bytes)
                )
            elif field == _EXPR_STRUCT:  # entries = 2: map_key = 3, value = 4
                for f, entry in pb_fields(value):
                    if f == 2 and isinstance(entry, bytes):
                        stack.extend(
                            (v, bound)
                            for g, v in pb_fields(entry)
                            if g in (3, 4) and isinstance(v, bytes)
                        )
            elif field == _EXPR_COMPREHENSION:
                stack.extend(_comprehension(value, bound))
    return frozenset(found)


def _comprehension(buf: bytes, bound: frozenset[str]) -> Iterator[tuple[bytes, frozenset[str]]]:
    # iter_var = 1, iter_range = 2, accu_var = 3, accu_init = 4, loop_condition = 5,
    # loop_step = 6, result = 7, iter_var2 = 8
    parts = [(f, v) for f, v in pb_fields(buf) if isinstance(v, bytes)]
    names = {f: v.decode() for f, v in parts if f in (1, 3, 8)}
    in_loop = bound | set(names.values())
    in_result = bound | ({names[3]} if 3 in names else set())
    for f, v in parts:
        if f in (2, 4):
            yield v, bound
        elif f in (5, 6):
            yield v, in_loop
        elif f == 7:
            yield v, in_result
