"""The import picture has no cycle and no arrow up (pyproject.toml's import-linter contracts)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter")
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache", *args], cwd=ROOT, capture_output=True, text=True)


def test_import_contracts_hold():
    done = lint_imports()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_check_sees_real_imports(tmp_path):
    """The same tool with the layers upside down must fail: the contracts are checked against the
    package's actual imports, not vacuously kept."""
    upside_down = tmp_path / "contracts.toml"
    upside_down.write_text('[tool.importlinter]\nroot_package = "memllm"\n\n'
                           '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\n'
                           'layers = ["memllm.core", "memllm.cli"]\n')
    done = lint_imports(str(upside_down))
    assert done.returncode != 0
    assert "memllm.cli" in done.stdout and "BROKEN" in done.stdout
