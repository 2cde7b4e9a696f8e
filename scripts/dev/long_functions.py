"""List functions in a package whose body exceeds a line limit (issue 17: one screen per function).

Usage: python scripts/dev/long_functions.py [ROOT=rehyat] [LIMIT=80]

Length: from the ``def`` line to the function's last line (signature, docstring and body), the measure issue 17
uses. Beside it: BODY (first statement after the signature, docstring included, to the end) and CODE (BODY less
the docstring). Nested functions are listed on their own and also count inside the function that holds them.
Prints ``LENGTH  BODY  CODE  path:line  qualified.name`` sorted longest first; exits 0.
"""

import ast
import sys
from pathlib import Path


def long_functions(root: Path, limit: int) -> list[tuple[int, int, int, str, int, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found.extend(_walk(tree, path, limit, prefix=""))
    return sorted(found, reverse=True)


def _docstring_lines(func: ast.AST) -> int:
    first = func.body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    return first.end_lineno - first.lineno + 1 if is_doc else 0


def _walk(node: ast.AST, path: Path, limit: int, prefix: str):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + child.name
            length = child.end_lineno - child.lineno + 1
            if length > limit:
                body = child.end_lineno - child.body[0].lineno + 1
                yield length, body, body - _docstring_lines(child), str(path), child.lineno, name
            yield from _walk(child, path, limit, name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from _walk(child, path, limit, prefix + child.name + ".")
        else:
            yield from _walk(child, path, limit, prefix)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "rehyat")
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 80
    print("LENGTH  BODY  CODE  where  name")
    for length, body, code, path, line, name in long_functions(root, limit):
        print(f"{length:6d}  {body:4d}  {code:4d}  {path}:{line}  {name}")
