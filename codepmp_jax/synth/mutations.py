"""The `mutate` strategy: preference pairs from real functions and one semantic mutation each.

prompt = the code template around the function's signature and docstring, chosen = the real
function (docstring removed), rejected = the same function with one mutation. Both sides are
printed by `ast.unparse`, so formatting and comments cannot tell them apart; a mutant is kept only
if it parses, differs from the original after that normalisation, and its length stays within
`max_length_diff` of the original's.
"""
from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import hashlib
import random
from collections.abc import Iterator

OPERATORS = ("compare_swap", "arith_swap", "off_by_one", "wrong_variable", "negate_condition",
             "drop_statement", "swap_arguments", "early_return")
_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
            ast.NotIn: ast.In}
_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult,
          ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift,
          ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd}
_TYPED_CALLS = {"int": "int", "len": "int", "str": "str", "float": "float", "list": "list",
                "sorted": "list", "dict": "dict", "set": "set", "tuple": "tuple", "bool": "bool",
                "bytes": "bytes", "repr": "str"}
_INDEX_NAMES = {"i", "j", "k", "n", "idx", "index", "pos", "start", "end", "stop", "lo", "hi", "mid",
                "begin", "offset", "count", "size", "length", "m"}
_UNSWAPPABLE_CALLS = {"max", "min", "isinstance", "issubclass", "hasattr", "getattr", "setattr",
                      "delattr", "zip", "set", "frozenset", "print"}
_SIMPLE_STATEMENTS = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return, ast.Raise,
                      ast.Assert, ast.Delete, ast.Break, ast.Continue, ast.Import, ast.ImportFrom)


@dataclasses.dataclass(frozen=True)
class Function:
  """A documented function: `description` is its signature + docstring, `code` the rest."""
  qualname: str
  description: str
  code: str
  node: ast.FunctionDef | ast.AsyncFunctionDef


@dataclasses.dataclass(frozen=True)
class Site:
  """Where and how to mutate: `index` into `body_nodes` (-1: the function itself)."""
  op: str
  index: int
  variant: tuple

  def key(self) -> str:
    """A stable text form, part of the record id."""
    return f"{self.op}@{self.index}:{self.variant}"


@dataclasses.dataclass(frozen=True)
class Mutant:
  site: Site
  code: str


def extract_functions(source: str) -> tuple[list[Function], collections.Counter]:
  """Documented, non-trivial functions and methods (nested ones too) of a module, with counts."""
  counts = collections.Counter()
  found: list[Function] = []
  seen: collections.Counter = collections.Counter()

  def visit(parent: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(parent):
      if isinstance(child, ast.ClassDef):
        visit(child, f"{prefix}{child.name}.")
      elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        qualname = f"{prefix}{child.name}"
        seen[qualname] += 1
        if seen[qualname] > 1:
          qualname = f"{qualname}#{seen[qualname]}"
        counts["functions"] += 1
        fn = _split_docstring(child, qualname)
        if fn is None:
          counts["no_docstring"] += 1
        elif _trivial(fn.node.body):
          counts["trivial_body"] += 1
        else:
          found.append(fn)
        visit(child, f"{qualname}.")

  visit(ast.parse(source), "")
  return found, counts


def _split_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, qualname: str) -> Function | None:
  """The function split into description (signature + docstring) and code (without docstring)."""
  if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
    return None
  head = copy.copy(node)
  head.body = node.body[:1]
  body = copy.copy(node)
  body.body = node.body[1:]
  code = ast.unparse(body)
  return Function(qualname, ast.unparse(head), code, _parse_function(code))


def _parse_function(code: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
  """A fresh tree of `code` (much faster than copy.deepcopy, and the same node order every time)."""
  return ast.parse(code).body[0]


def _trivial(body: list[ast.stmt]) -> bool:
  """Whether a body only passes, is `...`, or raises NotImplementedError."""
  for stmt in body:
    if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
      continue
    if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
      continue
    return False
  return True


def body_nodes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.AST]:
  """Every node of the function body in a fixed order (the same order on a deep copy)."""
  return [n for stmt in fn.body for n in ast.walk(stmt)]


def _annotation_ids(fn: ast.AST) -> set[int]:
  """ids of nodes inside annotations, which mutations leave alone."""
  out = set()
  for n in ast.walk(fn):
    if isinstance(n, ast.AnnAssign):
      out.update(id(m) for m in ast.walk(n.annotation))
  return out


def _constant_type(value: ast.AST) -> str | None:
  """The builtin type an expression evidently has, if any."""
  if isinstance(value, ast.Constant) and value.value is not None and value.value is not ...:
    return type(value.value).__name__
  kinds = {ast.List: "list", ast.ListComp: "list", ast.Dict: "dict", ast.DictComp: "dict",
           ast.Set: "set", ast.SetComp: "set", ast.Tuple: "tuple", ast.JoinedStr: "str"}
  if type(value) in kinds:
    return kinds[type(value)]
  if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
    return _TYPED_CALLS.get(value.func.id)
  return None


def _annotation_type(annotation: ast.AST | None) -> str | None:
  """The builtin type named by an annotation such as `int` or `list[str]`."""
  if isinstance(annotation, ast.Subscript):
    annotation = annotation.value
  if isinstance(annotation, ast.Name) and annotation.id in set(_TYPED_CALLS.values()):
    return annotation.id
  return None


def variable_types(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, tuple[str, int]]:
  """Local names with one evident builtin type -> (type, line first defined)."""
  found: dict[str, tuple[str | None, int]] = {}

  def note(name: str, kind: str | None, line: int) -> None:
    if name in found:
      if found[name][0] != kind:
        found[name] = (None, found[name][1])
    else:
      found[name] = (kind, line)

  args = fn.args
  positional = args.posonlyargs + args.args
  defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
  for arg, default in zip(positional + args.kwonlyargs, defaults + list(args.kw_defaults)):
    kind = _annotation_type(arg.annotation) or (_constant_type(default) if default is not None else None)
    note(arg.arg, kind, fn.lineno)
  for n in ast.walk(fn):
    if isinstance(n, ast.Assign):
      for target in n.targets:
        if isinstance(target, ast.Name):
          note(target.id, _constant_type(n.value), n.lineno)
    elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
      note(n.target.id, _annotation_type(n.annotation), n.lineno)
    elif isinstance(n, (ast.For, ast.AsyncFor)) and isinstance(n.target, ast.Name):
      is_range = isinstance(n.iter, ast.Call) and isinstance(n.iter.func, ast.Name) and n.iter.func.id == "range"
      note(n.target.id, "int" if is_range else None, n.lineno)
  return {k: (t, line) for k, (t, line) in found.items() if t is not None and k not in ("self", "cls")}


def find_sites(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[Site]:
  """Every mutation this function admits, for all `OPERATORS`."""
  nodes = body_nodes(fn)
  skip = _annotation_ids(fn)
  types = variable_types(fn)
  sites: list[Site] = []
  for i, n in enumerate(nodes):
    if id(n) in skip:
      continue
    if isinstance(n, ast.Compare):
      sites += [Site("compare_swap", i, (j,)) for j, op in enumerate(n.ops) if type(op) in _COMPARE]
    if isinstance(n, (ast.BinOp, ast.AugAssign)) and type(n.op) in _ARITH and not _is_text_op(n):
      sites.append(Site("arith_swap", i, ()))
    sites += [Site("off_by_one", i, (where, d)) for where in _bound_slots(n, types) for d in (1, -1)]
    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in types:
      kind, _ = types[n.id]
      others = sorted(w for w, (t, line) in types.items() if t == kind and w != n.id and line < n.lineno)
      sites += [Site("wrong_variable", i, (w,)) for w in others[:2]]
    if isinstance(n, (ast.If, ast.While, ast.IfExp, ast.Assert)) and not isinstance(n.test, ast.Constant):
      sites.append(Site("negate_condition", i, ()))
    sites += [Site("drop_statement", i, s) for s in _droppable(n)]
    if isinstance(n, ast.Call) and _swappable_call(n):
      sites += [Site("swap_arguments", i, (j,)) for j in range(len(n.args) - 1)
                if ast.dump(n.args[j]) != ast.dump(n.args[j + 1]) and not _is_str(n.args[j])
                and not _is_str(n.args[j + 1])]
  sites += [Site("drop_statement", -1, s) for s in _droppable(fn)]
  sites += [Site("early_return", -1, (p,)) for p in _early_return_positions(fn)]
  return sites


def _is_str(n: ast.AST) -> bool:
  return isinstance(n, (ast.JoinedStr, ast.Constant)) and isinstance(getattr(n, "value", ""), (str, bytes))


def _is_text_op(n: ast.BinOp | ast.AugAssign) -> bool:
  """String concatenation or %-formatting, where an operator swap is a trivial type error."""
  operands = [n.left, n.right] if isinstance(n, ast.BinOp) else [n.value]
  return any(_is_str(x) for x in operands)


def _bound_slots(n: ast.AST, types: dict) -> list[str]:
  """Which children of `n` are a bound or index that an off-by-one can shift."""
  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "range" and not n.keywords:
    if len(n.args) == 1:
      return ["arg0"]
    return ["arg0", "arg1"] if len(n.args) in (2, 3) else []
  if isinstance(n, ast.Subscript):
    s = n.slice
    if isinstance(s, ast.Slice):
      return [f for f in ("lower", "upper") if getattr(s, f) is not None and _indexlike(getattr(s, f), types)]
    return ["index"] if _indexlike(s, types) else []
  return []


def _indexlike(e: ast.AST, types: dict) -> bool:
  """An integer constant, a name that holds an int, or arithmetic on them."""
  if isinstance(e, ast.Constant):
    return type(e.value) is int
  if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub):
    return _indexlike(e.operand, types)
  if isinstance(e, ast.Name):
    return types.get(e.id, ("",))[0] == "int" or e.id in _INDEX_NAMES
  if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Add, ast.Sub, ast.FloorDiv)):
    return _indexlike(e.left, types) or _indexlike(e.right, types)
  return isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "len"


def _droppable(n: ast.AST) -> list[tuple[str, int]]:
  """(field, position) of simple statements in `n`'s statement lists that can be dropped."""
  out = []
  for field in ("body", "orelse", "finalbody"):
    stmts = getattr(n, field, None)
    if isinstance(stmts, list) and len(stmts) >= 2 and isinstance(stmts[0], ast.stmt):
      out += [(field, p) for p, s in enumerate(stmts) if isinstance(s, _SIMPLE_STATEMENTS)
              and not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
  return out


def _swappable_call(n: ast.Call) -> bool:
  """A call whose positional arguments can be swapped into a different meaning."""
  name = n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
  return (len(n.args) >= 2 and name not in _UNSWAPPABLE_CALLS
          and not any(isinstance(a, ast.Starred) for a in n.args))


def _early_return_positions(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[int]:
  """Top-level positions where inserting a return skips at least one real statement."""
  body = fn.body
  last = len(body) - (2 if isinstance(body[-1], ast.Return) else 1)
  return [p for p in range(1, last + 1) if not isinstance(body[p - 1], (ast.Return, ast.Raise))]


def _shift(e: ast.expr, delta: int) -> ast.expr:
  """`e + delta`, folded into an existing constant where there is one."""
  if isinstance(e, ast.Constant) and type(e.value) is int:
    return _int(e.value + delta)
  if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub) and isinstance(e.operand, ast.Constant):
    return _int(-e.operand.value + delta)
  if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Add, ast.Sub)) and \
      isinstance(e.right, ast.Constant) and type(e.right.value) is int:
    c = (e.right.value if isinstance(e.op, ast.Add) else -e.right.value) + delta
    if c == 0:
      return e.left
    return ast.BinOp(e.left, ast.Add() if c > 0 else ast.Sub(), ast.Constant(abs(c)))
  return ast.BinOp(e, ast.Add() if delta > 0 else ast.Sub(), ast.Constant(1))


def _int(v: int) -> ast.expr:
  return ast.Constant(v) if v >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-v))


def _negate(test: ast.expr) -> ast.expr:
  if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
    return test.operand
  return ast.UnaryOp(ast.Not(), test)


def apply(fn: Function, site: Site) -> ast.FunctionDef | ast.AsyncFunctionDef:
  """A mutated fresh tree of `fn` (`fn.node` is untouched)."""
  out = _parse_function(fn.code)
  n = out if site.index < 0 else body_nodes(out)[site.index]
  if site.op == "compare_swap":
    (j,) = site.variant
    n.ops[j] = _COMPARE[type(n.ops[j])]()
  elif site.op == "arith_swap":
    n.op = _ARITH[type(n.op)]()
  elif site.op == "off_by_one":
    where, delta = site.variant
    if where.startswith("arg"):
      k = int(where[3:])
      n.args[k] = _shift(n.args[k], delta)
    elif where == "index":
      n.slice = _shift(n.slice, delta)
    else:
      setattr(n.slice, where, _shift(getattr(n.slice, where), delta))
  elif site.op == "wrong_variable":
    n.id = site.variant[0]
  elif site.op == "negate_condition":
    n.test = _negate(n.test)
  elif site.op == "drop_statement":
    field, p = site.variant
    del getattr(n, field)[p]
  elif site.op == "swap_arguments":
    (j,) = site.variant
    n.args[j], n.args[j + 1] = n.args[j + 1], n.args[j]
  elif site.op == "early_return":
    (p,) = site.variant
    returns = [r for r in ast.walk(out) if isinstance(r, ast.Return) and r.value is not None]
    stmt = copy.deepcopy(returns[-1]) if returns else ast.Return(None)
    out.body.insert(p, stmt)
  else:
    raise ValueError(f"unknown mutation operator {site.op!r}")
  return ast.fix_missing_locations(out)


def mutants(fn: Function, k: int, rng: random.Random, max_length_diff: float,
            counts: collections.Counter, balance: int = 0) -> tuple[list[Mutant], int]:
  """Up to `k` valid mutants of `fn`, spread over operators; rejects are counted.

  `balance` is how many more rejected sides so far were longer than their chosen side than
  shorter; mutants are picked (from up to 2k valid candidates) to pull it back towards 0, so that
  "the longer one is worse" is no cue. Returns the mutants and the updated balance.
  """
  by_op = collections.defaultdict(list)
  for site in find_sites(fn.node):
    by_op[site.op].append(site)
  if not by_op:
    counts["no_site"] += 1
    return [], balance
  ops = sorted(by_op)
  rng.shuffle(ops)
  for op in ops:
    rng.shuffle(by_op[op])
  original = ast.dump(fn.node)
  pool: list[Mutant] = []
  seen = {original}
  for site in _round_robin([by_op[op] for op in ops]):
    if len(pool) == 2 * k:
      break
    code = ast.unparse(apply(fn, site))
    try:
      normal = ast.dump(_parse_function(code))
    except SyntaxError:
      counts["mutant_unparsable"] += 1
      continue
    if normal in seen:
      counts["mutant_unchanged" if normal == original else "mutant_duplicate"] += 1
      continue
    if abs(len(code) - len(fn.code)) > max_length_diff * len(fn.code):
      counts["mutant_length_cue"] += 1
      continue
    seen.add(normal)
    pool.append(Mutant(site, code))
  accepted = []
  while pool and len(accepted) < k:
    pick = next((m for m in pool if _sign(m, fn) * balance <= 0), pool[0])
    pool.remove(pick)
    accepted.append(pick)
    balance += _sign(pick, fn)
  counts["mutant_not_picked"] += len(pool)
  return accepted, balance


def _sign(m: Mutant, fn: Function) -> int:
  """+1 if the mutant is longer than the original, -1 if shorter, else 0."""
  return (len(m.code) > len(fn.code)) - (len(m.code) < len(fn.code))


def _round_robin(lists: list[list[Site]]) -> Iterator[Site]:
  for i in range(max(len(x) for x in lists)):
    for x in lists:
      if i < len(x):
        yield x[i]


def pair_id(source_id: str, qualname: str, site: Site) -> str:
  """A stable record id from the source file, the function and the mutation."""
  key = f"{source_id}::{qualname}::{site.key()}"
  return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:20]
