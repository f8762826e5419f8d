"""The commands of README.md and docs/*.md that are marked to run quickly (fenced as ```bash quick) run, in the
order written, each document in its own copy of the repository, and exit 0: the docs cannot rot. Commands that
need GPUs, several nodes or minutes are in plain ```bash blocks and are not run here."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
BLOCK = re.compile(r"^```bash quick\n(.*?)^```", re.S | re.M)


def quick_blocks(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return BLOCK.findall(f.read())


def repo_copy(tmp_path):
    """A copy of the tracked files (the corpus included) whose .venv is the venv running the tests, linked in entry by
    entry beside a .installed stamp of its own, newer than the copy's requirements.txt: `make .venv/.installed` there
    finds the venv in place and runs nothing. (A link to the whole venv made the copy's requirements.txt newer than
    the checkout's stamp: make re-ran pip and touched the checkout's stamp through the link, and every `make demo`
    after the suite re-trained its tokenizer over out/demo's: issue 28.)"""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    venv = os.path.dirname(os.path.dirname(sys.executable))  # the venv running the tests: .venv/bin/python
    os.mkdir(tmp_path / ".venv")
    for entry in os.listdir(venv):
        if entry != ".installed":
            os.symlink(os.path.join(venv, entry), tmp_path / ".venv" / entry)
    (tmp_path / ".venv" / ".installed").touch()
    return tmp_path


def checkout_state():
    """What a test must not change in the checkout it runs from: the venv's stamp, and out/ (each path's mtime)."""
    stamp = os.path.join(ROOT, ".venv", ".installed")
    out = [(os.path.relpath(os.path.join(d, n), ROOT), os.lstat(os.path.join(d, n)).st_mtime_ns)
           for d, dirs, names in os.walk(os.path.join(ROOT, "out")) for n in dirs + names]
    return os.stat(stamp).st_mtime_ns if os.path.exists(stamp) else None, sorted(out)


@pytest.mark.parametrize("doc", [d for d in DOCS if quick_blocks(d)])
def test_quick_commands_run(doc, tmp_path):
    """Each block of the doc, as one bash script, in a copy of the repository (repo_copy)."""
    before = checkout_state()
    repo_copy(tmp_path)
    for i, block in enumerate(quick_blocks(doc)):
        proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        where = f"{doc}, quick block {i + 1}:\n{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, where
        assert "Traceback" not in proc.stderr, f"{doc}, quick block {i + 1}:\n{proc.stderr[-3000:]}"
    assert checkout_state() == before, "the commands changed the checkout's .venv/.installed or out/"


def test_quick_commands_leave_the_checkout_alone(tmp_path):
    """The README's first quick command, `make .venv/.installed`, in the copy test_quick_commands_run makes: it
    runs nothing, and the checkout's .venv/.installed and out/ are as they were (issue 28)."""
    before = checkout_state()
    proc = subprocess.run(["make", ".venv/.installed"], cwd=repo_copy(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is up to date" in proc.stdout and "pip" not in proc.stdout, proc.stdout
    assert checkout_state() == before


def test_figures_draw(tmp_path):
    """docs/figures.py still runs: the walkthrough's four figures, from the per-rank shapes of the real model."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "figures.py"), "--out", tmp_path], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("tp_mlp", "vocab_parallel", "sequence_parallel", "zero1"):
        assert os.path.getsize(tmp_path / f"{name}.png") > 10_000


CODE_REF = re.compile(r"`([\w/]+\.py):([\w.]+)`")  # `file.py:name` or `file.py:Class.method` in the prose


def test_code_the_docs_name_exists():
    """Every `file.py:name` that README.md and docs/*.md point a reader to is defined in that file."""
    missing = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            refs = CODE_REF.findall(f.read())
        for path, name in refs:
            if path == "file.py":  # the docs' own notation
                continue
            try:
                with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                    source = f.read()
            except FileNotFoundError:
                missing.append(f"{doc}: {path} (no such file)")
                continue
            *outer, last = name.split(".")
            if not re.search(rf"^\s*(def|class) {last}\b|^{last}\s*[:=]", source, re.M) or \
                    any(not re.search(rf"^class {o}\b", source, re.M) for o in outer):
                missing.append(f"{doc}: {path}:{name}")
    assert not missing, "the docs name code that is not there:\n" + "\n".join(missing)
