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


@pytest.mark.parametrize("doc", [d for d in DOCS if quick_blocks(d)])
def test_quick_commands_run(doc, tmp_path):
    """A copy of the tracked files (the corpus included), the venv linked in, then each block as one bash script."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    venv = os.path.dirname(os.path.dirname(sys.executable))  # the venv running the tests: .venv/bin/python
    os.symlink(venv, tmp_path / ".venv")
    for i, block in enumerate(quick_blocks(doc)):
        proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        where = f"{doc}, quick block {i + 1}:\n{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, where
        assert "Traceback" not in proc.stderr, f"{doc}, quick block {i + 1}:\n{proc.stderr[-3000:]}"


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
