"""Specialised copies of a function, generated from its own source with some of its arguments fixed.

The span machinery has one generic :func:`~cmbagent_otel._spans.start` for every span shape; the hot
span types (an agent turn, a model call, a tool call) always pass it the same kind, OTel span kind and
no run, conversation or scope change, and it tests each of them again on every span. Written out by
hand per type, the specialised starts were copies of it (reverted in session 38). Here they are
generated from ``start``'s own syntax tree, as the DAG writer's row converters are generated from
one description (``dag/statements.py``): the fixed arguments become constants, every test they decide
is folded away, and small helpers called from the function are written in. ``start`` stays the one
source of truth: a specialised copy runs exactly its statements for those arguments, on the same
source lines (tracebacks and line-based hooks see ``start``'s lines).

Only what is sure is folded: a test whose every operand is a fixed argument, a module constant named
by the caller (read once, here: ``_GIL``, ``SPAN_KEY``...), a literal, or a name known not to be
``None`` compared with ``None``. Anything else stays as it is in the source.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import inspect
import logging
import operator
import textwrap
from collections.abc import Callable, Iterable, Mapping
from types import CodeType
from typing import Any

logger = logging.getLogger("cmbagent_otel")

# values the compiler takes as literals (ast.Constant); others are handed to the copy as closure variables
_LITERALS = (type(None), bool, int, float, str, bytes)
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.Eq: operator.eq, ast.NotEq: operator.ne,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}


class _NotNone:
    """The value of a name known not to be ``None`` (only its ``is``/``is not None`` tests fold)."""


_NOT_NONE = _NotNone()
_UNKNOWN = object()
_TRY = (ast.Try, ast.TryStar) if hasattr(ast, "TryStar") else (ast.Try,)  # a `try` (and `try`/`except*`)


def _function_def(func: Callable[..., Any]) -> ast.FunctionDef:
    tree = ast.parse(_source(func.__code__))
    ast.increment_lineno(tree, func.__code__.co_firstlineno - 1)
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise TypeError(f"{func.__qualname__} is not a plain function")
    return node


def _stored(statements: list[ast.stmt]) -> set[str]:
    """Every name ``statements`` bind (assignments, loop, ``with`` and ``except`` targets, nested definitions
    and their parameters)."""
    names: set[str] = set()
    for node in (n for statement in statements for n in ast.walk(statement)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.ExceptHandler, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _read(statements: list[ast.stmt]) -> set[str]:
    """Every name ``statements`` read."""
    return {n.id for statement in statements for n in ast.walk(statement)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@functools.lru_cache(maxsize=16)
def _source(code: CodeType) -> str:
    """A function's source, dedented (read once: several copies are generated from one function)."""
    return textwrap.dedent(inspect.getsource(code))


class _Rename(ast.NodeTransformer):
    """Names replaced by expressions (a helper's parameters by its caller's arguments) or renamed."""

    def __init__(self, names: Mapping[str, ast.Name | ast.Constant]) -> None:
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.expr:
        found = self.names.get(node.id)
        if found is None:
            return node
        if isinstance(found, ast.Constant):  # a literal argument: read only (parameters are never assigned)
            return ast.copy_location(ast.Constant(found.value), node)
        return ast.copy_location(ast.Name(found.id, node.ctx), node)  # type: ignore[attr-defined]


def _shared(name: str, caller: Mapping[str, Any], helper: Mapping[str, Any]) -> bool:
    """Whether ``name`` read in a helper's module (globals ``helper``) is the same object read in the caller's:
    the same module global in both, or a builtin neither module shadows."""
    if name in caller:
        return name in helper and caller[name] is helper[name]
    return name not in helper and hasattr(builtins, name)


class _Inline(ast.NodeTransformer):
    """Calls of the given helpers, as a statement or as the value of an assignment, written in.

    A helper of the caller's module is called by its name (``_name_node(...)``); a method is called through
    the class the caller's module names (``Scope.child_node(scope, ...)``: that function whatever the
    receiver); a function of another module by the name the caller's module imports it under (the same
    object). A helper of another module is written in when every global it reads is the same object in the
    caller's: its statements then take the line of the call (its own lines are another file's). A helper's
    own calls of the given helpers are written in too (nested: a recorder's ``_response_facts`` and the
    ``usage_attributes`` it calls)."""

    def __init__(self, helpers: Iterable[Callable[..., Any]], globals_: Mapping[str, Any],
                 caller: ast.FunctionDef) -> None:
        # the caller's own names: a helper's global read must not meet one of them once written in
        self.caller_names = _stored(caller.body) | {a.arg for a in [*caller.args.args, *caller.args.kwonlyargs,
                                                                    *filter(None, (caller.args.vararg,
                                                                                   caller.args.kwarg))]}
        self.helpers: dict[str | tuple[str, str], ast.FunctionDef] = {}
        self.foreign: set[str] = set()  # the helpers of another module (by definition name)
        # per `try` statement around the statement being visited, the names its exception handlers and finally
        # block read: bound early by a helper written in there (see _returned_into), an exception raised on the
        # helper's way would let them see its partial work (a helper written in outside any `try` cannot)
        self.guards: list[set[str]] = []
        for helper in helpers:
            owner, _, attribute = helper.__qualname__.rpartition(".")
            if owner:  # a method: called through its class, which the caller's module must name
                if "." in owner or globals_.get(owner) is None or vars(globals_[owner]).get(attribute) is not helper:
                    raise ValueError(f"{helper.__qualname__} is not called through a class of the caller's module")
                key: str | tuple[str, str] = (owner, attribute)
            elif helper.__globals__ is not globals_ and globals_.get(helper.__name__) is not helper:
                raise ValueError(f"{helper.__qualname__} is from another module, not imported by its name")
            else:
                key = helper.__name__
            definition = _function_def(helper)
            body = definition.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # its docstring
            returns = [n for n in ast.walk(definition) if isinstance(n, ast.Return)]
            if (returns and returns != [body[-1]]) or definition.args.vararg or definition.args.kwarg \
                    or definition.args.kwonlyargs or definition.args.posonlyargs \
                    or any(isinstance(n, (ast.FunctionDef, ast.Lambda, ast.ClassDef, ast.Global, ast.Nonlocal,
                                          ast.Yield, ast.YieldFrom, ast.Await))
                           for stmt in body for n in ast.walk(stmt)):
                raise ValueError(f"{helper.__qualname__} cannot be written in")
            definition.body = body
            if helper.__globals__ is not globals_:
                # written into the caller, its global reads would read the caller's module
                read = _read(body) - _stored(body) - {a.arg for a in definition.args.args}
                if not all(_shared(name, globals_, helper.__globals__) for name in read):
                    raise ValueError(f"{helper.__qualname__} reads a global the caller's module does not share")
                self.foreign.add(definition.name)
            self.helpers[key] = definition

    def _call(self, call: ast.expr) -> ast.FunctionDef | None:
        if not isinstance(call, ast.Call):
            return None
        func = call.func
        if isinstance(func, ast.Name):
            return self.helpers.get(func.id)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return self.helpers.get((func.value.id, func.attr))
        return None

    def _written_in(self, definition: ast.FunctionDef, call: ast.Call,
                    target: ast.expr | None) -> list[ast.stmt]:
        params = [a.arg for a in definition.args.args]
        if call.keywords or len(call.args) != len(params) or any(isinstance(a, ast.Starred) for a in call.args):
            raise ValueError(f"{definition.name}: only positional calls with every argument are written in")
        body = [copy.deepcopy(stmt) for stmt in definition.body]  # positions kept: the helper's own lines
        stored = _stored(body)
        if stored & set(params):
            raise ValueError(f"{definition.name} assigns a parameter")
        if (_read(body) - stored - set(params)) & self.caller_names:
            raise ValueError(f"{definition.name} reads a global that {definition.name}'s caller has as a local")
        prefix = f"_{definition.name.lstrip('_')}_"
        names: dict[str, ast.Name | ast.Constant] = {name: ast.Name(prefix + name, ast.Load()) for name in stored}
        out: list[ast.stmt] = []
        for param, arg in zip(params, call.args, strict=True):
            if isinstance(arg, (ast.Name, ast.Constant)):
                names[param] = arg  # a plain name or literal: read where the helper reads it
            else:  # evaluated once, first, as the call would
                names[param] = ast.Name(prefix + param, ast.Load())
                out.append(ast.copy_location(ast.Assign([ast.Name(prefix + param, ast.Store())], arg), call))
        returned = self._returned_into(body, target, stored, call)
        names.update(returned)
        body = [_Rename(names).visit(stmt) for stmt in body]
        if body and isinstance(body[-1], ast.Return):
            value = body.pop().value or ast.Constant(None)
            if returned and isinstance(value, ast.Tuple):  # the elements not already in their targets
                kept = [(t, v) for t, v in zip(target.elts, value.elts, strict=True)  # type: ignore[union-attr]
                        if not (isinstance(v, ast.Name) and v.id == t.id)]  # type: ignore[attr-defined]
                if kept:
                    targets, values = zip(*kept, strict=True)
                    target = ast.Tuple(list(targets), ast.Store()) if len(kept) > 1 else targets[0]
                    value = ast.Tuple(list(values), ast.Load()) if len(kept) > 1 else values[0]
                else:
                    value = None  # type: ignore[assignment]
            elif returned:
                value = None  # type: ignore[assignment]  # the one returned local is the target itself
            if value is not None:
                last = ast.Assign([target], value) if target is not None else ast.Expr(value)
                body.append(ast.copy_location(last, value))
        if definition.name in self.foreign:  # another file's lines: the call's line instead
            for node in (n for stmt in body for n in ast.walk(stmt)):
                if "lineno" in node._attributes:
                    node.lineno, node.end_lineno = call.lineno, call.end_lineno  # type: ignore[attr-defined]
                    node.col_offset, node.end_col_offset = call.col_offset, call.end_col_offset  # type: ignore[attr-defined]
        out.extend(body)
        return out

    def _returned_into(self, body: list[ast.stmt], target: ast.expr | None, stored: set[str],
                       call: ast.Call) -> dict[str, ast.Name | ast.Constant]:
        """The helper's locals it returns as they are (``return new``, ``return node_id, depth, order``) that can
        be the caller's targets themselves, so no copy is made at the end: each a target name of its own, read
        neither by the call's arguments nor on failure by a ``try`` around the call. (The target is bound on the
        helper's way rather than at its end, which only an exception raised meanwhile could tell.)"""
        read_on_failure = set().union(*self.guards)
        last = body[-1] if body else None
        if not isinstance(last, ast.Return) or last.value is None or target is None:
            return {}
        if isinstance(target, ast.Tuple) and isinstance(last.value, ast.Tuple) \
                and len(target.elts) == len(last.value.elts):
            pairs = list(zip(last.value.elts, target.elts, strict=True))
        else:
            pairs = [(last.value, target)]
        passed = {a.id for a in call.args if isinstance(a, ast.Name)}
        locals_ = [v.id for v, _ in pairs if isinstance(v, ast.Name)]
        names = [t.id for _, t in pairs if isinstance(t, ast.Name)]
        if len(names) != len(pairs) or len(set(names)) != len(names):
            return {}
        renamed: dict[str, ast.Name | ast.Constant] = {}
        for value, into in pairs:
            if isinstance(value, ast.Name) and value.id in stored and locals_.count(value.id) == 1 \
                    and into.id not in passed and into.id not in read_on_failure:  # type: ignore[attr-defined]
                renamed[value.id] = ast.Name(into.id, ast.Load())  # type: ignore[attr-defined]
        return renamed

    def generic_visit(self, node: ast.AST) -> ast.AST:
        guarded = isinstance(node, _TRY)
        if guarded:  # what its handlers and finally block read, while everything inside it is visited
            self.guards.append({n.id for stmt in [*(s for h in node.handlers for s in h.body), *node.finalbody]
                                for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)})
        try:
            return self._visit_blocks(node)
        finally:
            if guarded:
                self.guards.pop()

    def _visit_blocks(self, node: ast.AST) -> ast.AST:
        for field in ("body", "orelse", "finalbody"):  # an except clause's body: when its handler is visited
            statements = getattr(node, field, None)
            if not isinstance(statements, list):
                continue
            out: list[ast.stmt] = []
            for stmt in statements:
                definition = None
                if isinstance(stmt, ast.Expr):
                    definition = self._call(stmt.value)
                    target = None
                elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                    definition = self._call(stmt.value)
                    target = stmt.targets[0]
                if definition is not None:
                    written = self._written_in(definition, stmt.value, target)  # type: ignore[arg-type]
                    holder = ast.Module(body=written, type_ignores=[])
                    self._visit_blocks(holder)  # the helpers it calls at its own top level (nested ones: below)
                    out.extend(holder.body)
                else:
                    out.append(stmt)
            setattr(node, field, out)
        return super().generic_visit(node)


class _Fold(ast.NodeTransformer):
    """Tests decided by the known values folded away (see the module's docstring)."""

    def __init__(self, known: Mapping[str, Any], not_none: Iterable[str]) -> None:
        self.known = dict(known)
        self.known.update((name, _NOT_NONE) for name in not_none)

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            return self.known.get(node.id, _UNKNOWN)
        return _UNKNOWN

    def constant(self, value: Any, node: ast.AST) -> ast.AST:
        return ast.copy_location(ast.Constant(value), node) if isinstance(value, _LITERALS) else node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        value = self.known.get(node.id, _UNKNOWN) if isinstance(node.ctx, ast.Load) else _UNKNOWN
        return self.constant(value, node) if value is not _UNKNOWN and value is not _NOT_NONE else node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
            return node
        left, right = self.value(node.left), self.value(node.comparators[0])
        if left is _UNKNOWN or right is _UNKNOWN:
            return node
        if left is _NOT_NONE or right is _NOT_NONE:
            if not isinstance(node.ops[0], (ast.Is, ast.IsNot)) or not (left is None or right is None):
                return node
            return self.constant(isinstance(node.ops[0], ast.IsNot), node)
        result = _COMPARE[type(node.ops[0])](left, right)
        return self.constant(result, node) if type(result) is bool else node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        value = self.value(node.operand)
        if isinstance(node.op, ast.Not) and value is not _UNKNOWN and value is not _NOT_NONE:
            return self.constant(not value, node)
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        stops = isinstance(node.op, ast.Or)  # the truth that ends the evaluation: `or` stops at a true value
        kept: list[ast.expr] = []
        for i, operand in enumerate(node.values):
            value = self.value(operand)
            if value is _UNKNOWN or value is _NOT_NONE or not isinstance(value, _LITERALS):
                kept.append(operand)
                continue
            if bool(value) is stops:  # it ends the evaluation: its value is the result when reached
                kept.append(operand)
                break
            if i == len(node.values) - 1:
                kept.append(operand)  # the last operand's value is the result
            # else: it passes the evaluation on, whatever it is
        if len(kept) == 1:
            return kept[0]
        node.values = kept
        return node

    def test(self, node: ast.expr) -> ast.expr:
        """``node`` as a test (only its truth counts): a known operand that cannot change the outcome of an
        ``and``/``or`` dropped, one that decides it ending it when nothing before it can have effects."""
        if not isinstance(node, ast.BoolOp):
            return node
        neutral = isinstance(node.op, ast.And)  # the truth an operand passes on: true for `and`
        kept: list[ast.expr] = []
        for operand in node.values:
            operand = self.test(operand)
            value = self.value(operand)
            if value is _UNKNOWN or value is _NOT_NONE or not isinstance(value, _LITERALS):
                kept.append(operand)
            elif bool(value) is not neutral:  # it decides the test when reached
                if all(_pure(k) for k in kept):
                    return ast.copy_location(ast.Constant(not neutral), node)
                kept.append(operand)
                break
        if not kept:
            return ast.copy_location(ast.Constant(neutral), node)
        if len(kept) == 1:
            return kept[0]
        node.values = kept
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        node.test = self.test(node.test)
        value = self.value(node.test)
        if value is _UNKNOWN or value is _NOT_NONE or not isinstance(value, _LITERALS):
            return node
        return node.body if value else node.orelse

    def visit_If(self, node: ast.If) -> Any:
        self.generic_visit(node)
        node.test = self.test(node.test)
        value = self.value(node.test)
        if value is _UNKNOWN or value is _NOT_NONE or not isinstance(value, _LITERALS):
            return node
        return node.body if value else node.orelse  # spliced in its place (nothing: removed)

    def visit_Try(self, node: ast.Try) -> Any:
        """A ``try`` whose body folded to nothing (``try: pass``) and has no ``else``: nothing in it can raise, so
        no handler runs and its ``finally`` block runs as plain statements (spliced in its place)."""
        self.generic_visit(node)
        if node.orelse or not all(isinstance(statement, ast.Pass) for statement in node.body):
            return node
        return node.finalbody

    visit_TryStar = visit_Try

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list) and not body:  # every statement of a block folded away
            body.append(ast.copy_location(ast.Pass(), node))
        return node


def _pure(node: ast.expr) -> bool:
    """Whether evaluating ``node`` can have no effect (names, literals, identity tests and ``not`` of them). A
    name is taken as bound where it is read: reading an unbound one raises in the source, left out here."""
    if isinstance(node, (ast.Name, ast.Constant)):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _pure(node.operand)
    if isinstance(node, ast.Compare):
        return all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops) and _pure(node.left) \
            and all(_pure(c) for c in node.comparators)
    return False


def specialise(func: Callable[..., Any], name: str, fixed: Mapping[str, Any], *, not_none: Iterable[str] = (),
               constants: Iterable[str] = (), inline: Iterable[Callable[..., Any]] = ()) -> Callable[..., Any]:
    """``func`` with the arguments ``fixed`` (name: value) taken out of its signature, generated from its source.

    ``not_none``: parameters the callers never pass ``None`` (their ``is None`` tests fold); ``constants``: names of
    ``func``'s module globals that never change once imported (their tests fold); ``inline``: helpers of the same
    module, or methods called through a class ``func``'s module names (``Scope.child_node(scope, ...)``), called by
    ``func`` as a statement or an assignment's value, written in (then folded too; see :class:`_Inline`). The copy
    reads every other global live, as ``func`` does. When the source cannot be read or a step cannot be applied,
    the result calls ``func`` itself with the fixed arguments (same behaviour, no gain).
    """
    return specialiser(func, name, (), fixed=fixed, not_none=not_none, constants=constants, inline=inline)()


def specialiser(func: Callable[..., Any], name: str, free: Iterable[str], *, fixed: Mapping[str, Any] | None = None,
                not_none: Iterable[str] = (), constants: Iterable[str] = (),
                inline: Iterable[Callable[..., Any]] = (),
                awaiting: Iterable[str] = ()) -> Callable[..., Callable[..., Any]]:
    """What makes copies of ``func`` (as :func:`specialise` does) with the parameters ``free`` taken out of its
    signature too, each copy binding them to the values it is made with: ``make(*values)`` (in ``free``'s order).
    The source is read and compiled once, here; every copy is a new closure of the same code, its free
    parameters its closure variables (nothing is folded from their values). ``func`` may take ``*args`` and
    ``**kwargs`` (kept as they are): a wrapper's body, made per wrapped method.

    ``awaiting``: names (parameters of ``func``) whose calls in ``func``'s own statements are awaited, the copy an
    ``async def``: a coroutine method's wrapper from the same source as the plain one's. With ``awaiting``, a copy
    that cannot be generated raises (``func`` itself is no coroutine function to fall back on)."""
    free = list(free)
    fixed = dict(fixed or {})
    awaiting = list(awaiting)
    try:
        return _generate(func, name, fixed, free, set(not_none), list(constants), list(inline), awaiting)
    except Exception:
        if awaiting:
            raise
        logger.debug("cmbagent_otel: %s not generated; it calls %s", name, func.__qualname__, exc_info=True)
        return lambda *values: _calling(func, name, {**fixed, **dict(zip(free, values, strict=True))})


class _Awaited(ast.NodeTransformer):
    """Calls of the given names awaited (``original(self, *args)`` -> ``await original(self, *args)``)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in self.names:
            return ast.copy_location(ast.Await(node), node)
        return node


def _awaiting(definition: ast.FunctionDef, names: list[str]) -> ast.AsyncFunctionDef:
    """``definition`` as an ``async def`` awaiting its own calls of ``names`` (before any helper is written in)."""
    params = {a.arg for a in [*definition.args.args, *definition.args.kwonlyargs]}
    if not set(names) <= params or _stored(definition.body) & set(names):
        raise ValueError(f"{definition.name}: awaited names must be parameters it never assigns")
    body = [_Awaited(names).visit(statement) for statement in definition.body]
    fields = {field: getattr(definition, field) for field in definition._fields if hasattr(definition, field)}
    fields["body"] = body
    return ast.copy_location(ast.AsyncFunctionDef(**fields), definition)


def _generate(func: Callable[..., Any], name: str, fixed: Mapping[str, Any], free: list[str], not_none: set[str],
              constants: list[str], inline: list[Callable[..., Any]],
              awaiting: list[str] | None = None) -> Callable[..., Callable[..., Any]]:
    definition: Any = _function_def(func)
    globals_ = func.__globals__
    if awaiting:
        definition = _awaiting(definition, awaiting)
    if inline:
        definition = _Inline(inline, globals_, definition).visit(definition)
    args = definition.args
    removed = set(fixed) | set(free)
    unknown = (removed | not_none) - {a.arg for a in [*args.args, *args.kwonlyargs]}
    if unknown or args.posonlyargs or len(removed) != len(fixed) + len(free):
        raise ValueError(f"{func.__qualname__}: not plain parameters of it: {sorted(unknown)}")
    if _stored(definition.body) & (removed | not_none | set(constants)):
        raise ValueError(f"{func.__qualname__} assigns a fixed name")
    # the positional defaults stay aligned with the parameters left (the last ones)
    defaults: list[ast.expr | None] = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
    kept = [(a, d) for a, d in zip(args.args, defaults, strict=True) if a.arg not in removed]
    args.args = [a for a, _ in kept]
    args.defaults = [d for _, d in kept if d is not None]
    if any(d is None for _, d in kept[len(kept) - len(args.defaults):]):
        raise ValueError("a parameter without a default follows one with a default")
    kw = [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if a.arg not in removed]
    args.kwonlyargs, args.kw_defaults = [a for a, _ in kw], [d for _, d in kw]
    for arg in [*args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]:
        arg.annotation = None  # annotations are not evaluated in the copy: no import-time names needed
    definition.returns = None
    definition.decorator_list = []
    known = dict(fixed)
    known.update((constant, globals_[constant]) for constant in constants)
    definition = _Fold(known, not_none).visit(definition)
    definition.name = name
    # fixed values that are not literals (an enum member) and the free parameters reach the copy as closure variables
    cells = [n for n, v in fixed.items() if not isinstance(v, _LITERALS)]
    maker = ast.FunctionDef(
        name="_make", args=ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in [*cells, *free]], kwonlyargs=[],
                                         kw_defaults=[], defaults=[]),
        body=[definition, ast.Return(ast.Name(name, ast.Load()))], decorator_list=[], returns=None,
        lineno=definition.lineno, col_offset=0, end_lineno=definition.end_lineno, end_col_offset=0)
    module = ast.fix_missing_locations(ast.Module(body=[maker], type_ignores=[]))
    code = compile(module, inspect.getsourcefile(func) or f"<{name}>", "exec", dont_inherit=True)
    made: dict[str, Any] = {}
    exec(code, globals_, made)  # the copy's globals are func's module: every other name read live
    closure = made["_make"]
    values = [fixed[n] for n in cells]
    doc = f"{func.__qualname__} with {', '.join([*(f'{k}={v!r}' for k, v in fixed.items()), *free])} (generated)."

    def make(*bound: Any) -> Callable[..., Any]:
        if len(bound) != len(free):
            raise TypeError(f"{name} is made with {len(free)} values, not {len(bound)}")
        result: Callable[..., Any] = closure(*values, *bound)
        result.__qualname__ = result.__name__ = name
        result.__module__ = func.__module__
        result.__doc__ = doc
        return result

    return make


def _calling(func: Callable[..., Any], name: str, fixed: Mapping[str, Any]) -> Callable[..., Any]:
    """What :func:`specialise` returns when it cannot generate: ``func`` called with the fixed arguments, through
    one plain function made from its signature (no source needed), else through ``Signature.bind``."""
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    try:
        if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) \
                or any(p.name in fixed and p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
            raise ValueError("only plain parameters, *args and **kwargs are passed on by a made function")
        env: dict[str, Any] = {"_func": func}
        left: list[str] = []
        passed: list[str] = []
        for i, param in enumerate(params):
            if param.name in fixed:
                env[f"_fixed{i}"] = fixed[param.name]
                passed.append(f"_fixed{i}")
                continue
            if param.kind is not param.POSITIONAL_OR_KEYWORD:  # *args, **kwargs: passed on as they came
                star = "*" if param.kind is param.VAR_POSITIONAL else "**"
                left.append(star + param.name)
                passed.append(star + param.name)
                continue
            if param.default is param.empty:
                left.append(param.name)
            else:
                env[f"_default{i}"] = param.default
                left.append(f"{param.name}=_default{i}")
            passed.append(param.name)
        exec(f"def calling({', '.join(left)}):\n    return _func({', '.join(passed)})\n", env)
        made: Callable[..., Any] = env["calling"]
    except Exception:  # a signature a plain def cannot repeat
        left_signature = signature.replace(parameters=[p for p in params if p.name not in fixed])

        def made(*args: Any, **kwargs: Any) -> Any:
            arguments = dict(fixed)
            arguments.update(left_signature.bind(*args, **kwargs).arguments)
            whole = inspect.BoundArguments(signature, arguments)  # type: ignore[arg-type]
            return func(*whole.args, **whole.kwargs)
    made.__qualname__ = made.__name__ = name
    return made
