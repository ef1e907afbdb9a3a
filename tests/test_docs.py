"""The docs name what the code holds: docs/architecture.md's map lists every module."""

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
