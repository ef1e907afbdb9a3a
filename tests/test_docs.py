"""The docs name what the code holds (docs/architecture.md's map lists every module), and the code
keeps to the sizes a reader can hold: modules of at most 400 lines, functions of at most 60."""

import ast
import os
import re

from tests.helpers import ROOT


def test_the_architecture_map_lists_every_module():
    text = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    table = text.split("## The modules")[1].split("\n## ")[0]
    listed = set(re.findall(r"`(\w+)\.py`", table))
    package = os.path.join(ROOT, "alexnet_tf")
    modules = {name[:-3] for name in os.listdir(package)
               if name.endswith(".py") and name != "__init__.py"}
    assert modules - listed == set(), "modules missing from docs/architecture.md"
    assert listed - modules == set(), "docs/architecture.md names modules that do not exist"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def oversized(package):
    """'name: N lines' for each module of the directory `package` over MAX_MODULE_LINES, and
    'name:line function: N lines' for each function over MAX_FUNCTION_LINES."""
    found = []
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(package, name), encoding="utf-8").read()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_module_of_the_package_is_over_400_lines_and_no_function_over_60():
    assert oversized(os.path.join(ROOT, "alexnet_tf")) == []


def test_the_size_check_finds_a_long_module_and_a_long_method(tmp_path):
    # 59 body lines + the def: 60, allowed; one more is not. 400 lines allowed, 401 not.
    method = "\n".join(["class C:", "    def ok(self):"] + ["        x = 1"] * 59
                        + ["    def long(self):"] + ["        x = 1"] * 60)
    (tmp_path / "a.py").write_text(method + "\n")
    (tmp_path / "b.py").write_text("x = 1\n" * 400)
    (tmp_path / "c.py").write_text("x = 1\n" * 401)
    assert oversized(tmp_path) == ["a.py:62 long: 61 lines", "c.py: 401 lines"]
