"""The package as `pip install` gets it: a wheel built from this tree carries every CUDA/C++ source (they are
compiled on the user's machine on first use, so they must ship) and both entry points (`fp4c`, and the
`torch_dynamo_backends` entry that makes `torch.compile(model, backend="fp4")` work without an import)."""

from __future__ import annotations

import configparser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def source_tree(dest: pathlib.Path) -> pathlib.Path:
    """The files git would commit from this tree, copied to ``dest``: a build in the tree itself would also
    pick up a stale ``build/`` and the editable install's ``*.egg-info/SOURCES.txt``."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_wheel_ships_the_kernel_sources_and_entry_points(tmp_path):
    # built without build isolation (no network on the GPU machines): the build backend must be installed
    pytest.importorskip("setuptools", minversion="68")
    src = source_tree(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fp4_compile-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "fp4_compile" / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= names, sorted(sources - names)
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "fp4_compile").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    (entry_file,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    entries = configparser.ConfigParser()
    entries.read_string(zipfile.ZipFile(wheel).read(entry_file).decode())
    assert entries["torch_dynamo_backends"]["fp4"] == "fp4_compile.compile:fp4_backend"
    assert entries["console_scripts"]["fp4c"] == "fp4_compile.cli:main"
