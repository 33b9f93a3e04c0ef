"""The layout a reader of the paper walks: the seven method files at the top, support code in
packages that the method path imports only where needed, and equations in short functions."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEVEN = (
    "data.py",
    "eval.py",
    "oppo.py",
    "perception_loss.py",
    "reward.py",
    "rollout.py",
    "train.py",
)


def test_the_seven_method_files_stand_alone_at_the_top():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(SEVEN)


def test_importing_train_loads_no_tool_and_no_synthetic_world():
    """tools/ is a leaf; the synthetic world and the tiny thinker load only to build the
    defaults, never on the import path of a run on real data."""
    code = (
        "import sys, train\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tools', 'synthetic')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_nothing_outside_tools_imports_tools():
    importers = []
    for path in ROOT.glob("**/*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tools", "tests", ".venv", "runs"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "tools" for name in names):
                importers.append(str(relative))
    assert importers == []


def test_no_function_of_the_seven_files_is_longer_than_60_lines():
    long = []
    for name in SEVEN:
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{name}: {node.name} ({lines} lines)")
    assert long == []
