"""Every command in the README and docs/*.md runs as written: each fenced bash command's script
or module answers --help and lists every flag the command passes; a file it names exists; an
--init export belongs to an --out of the same page; and the pins whose packages nothing here
imports directly are still needed."""

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# launchers whose own options come before the script
LAUNCHERS = {"torchrun", "torch.distributed.run"}
# outputs a run writes without --out (train.py's default)
DEFAULT_OUTS = {"runs/oppo"}


def commands(page):
    """(page, command) of each command of a page's ```bash blocks: continued lines joined, a
    trailing comment dropped, `a && b` split."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            found += [(page.name, part.strip()) for part in line.split("&&") if part.strip()]
    return found


def target(command):
    """(python argv that runs the command's program, the flags it passes) or (None, [])."""
    words = shlex.split(command)
    if words[0] == "python" and words[1] == "-m" and words[2] not in LAUNCHERS:
        return ["-m", words[2]], words[3:]
    if words[0] in ("torchrun", "python"):
        rest = words[1:]
        # a launcher's own options, then its script
        while rest and (rest[0] in ("-m", *LAUNCHERS) or rest[0].startswith("--")):
            rest = rest[1:]
        return [rest[0]], rest[1:]
    return None, []


def flags(words):
    return [w.split("=")[0] for w in words if w.startswith("--")]


ALL = [cmd for page in PAGES for cmd in commands(page)]


def test_the_pages_hold_the_commands_a_user_runs():
    programs = {" ".join(target(cmd)[0] or []) for _, cmd in ALL}
    assert {"train.py", "eval.py", "data.py", "-m corpora.emer", "-m matching.matcher"} <= programs


def test_every_command_names_a_program_and_flags_that_exist():
    by_program = {}
    for page, cmd in ALL:
        program, words = target(cmd)
        if program is None:
            # pip install -r FILE, bash FILE
            words = shlex.split(cmd)
            named = words[words.index("-r") + 1 :][:1] if "-r" in words else words[1:]
            assert all((ROOT / w).exists() for w in named), (page, cmd)
            continue
        by_program.setdefault(tuple(program), []).append((page, cmd, flags(words)))

    def help_text(program):
        if program[0].endswith(".py") and not any(flags for _, _, flags in by_program[program]):
            # a worker script run with positional arguments
            assert (ROOT / program[0]).is_file(), program
            return ""
        proc = subprocess.run(
            [sys.executable, *program, "--help"], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, (program, proc.stderr[-2000:])
        return proc.stdout

    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(by_program, pool.map(help_text, by_program)))
    missing = []
    for program, uses in by_program.items():
        for page, cmd, used in uses:
            missing += [f"{page}: {cmd}: {f}" for f in used if f not in helps[program]]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_an_init_export_is_the_output_of_a_run_on_the_same_page(page):
    words = [w for _, cmd in commands(page) for w in shlex.split(cmd)]
    outs = {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out"} | DEFAULT_OUTS
    for i, word in enumerate(words[:-1]):
        if word == "--init":
            run = words[i + 1].rsplit("/", 2)[0]
            assert run in outs, f"{page.name}: --init {words[i + 1]}: no run writes {run}"


def test_the_pins_nothing_imports_directly_are_loaded_where_the_comments_say(tmp_path):
    # the thinker's video processor imports torchvision to resize frames
    code = (
        "import sys\n"
        "from transformers.models.qwen2_vl import video_processing_qwen2_vl\n"
        "print('torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    # the converters read parquet tables with datasets
    from datasets import Dataset

    from corpora import convert

    Dataset.from_list([{"name": "00025", "discrete": "happy"}]).to_parquet(tmp_path / "t.parquet")
    assert convert.read_table(tmp_path / "t.parquet") == [{"name": "00025", "discrete": "happy"}]
