"""`make compat` (tools/compat.py) runs the whole test suite on each stack, as `make test` runs it,
and says so in its row; a narrowed run says it is one.

The pip, build and test commands are recorded instead of run (no venv is made here).
"""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def compat(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("vit_fast_compat_tool", ROOT / "tools" / "compat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "WORK", tmp_path)
    mod.commands = []

    def run(cmd, log, cwd=None, env=None, check=True):
        mod.commands.append([str(c) for c in cmd])
        if _is_pytest(mod.commands[-1]):
            with open(log, "a") as f:
                f.write("1100 passed, 12 skipped in 3000.00s\n")
        return 0

    monkeypatch.setattr(mod, "_run", run)
    monkeypatch.setattr(mod, "_tracked_tree", lambda dst: None)
    monkeypatch.setattr(mod, "_extension_kind", lambda src: "CPU-only")
    monkeypatch.setattr(mod, "_versions", lambda python: ["2.11.0", "3.6.0", "2.3.5", "1.0.31", "5.23.0"])
    return mod


def _is_pytest(cmd):
    return cmd[1:3] == ["-m", "pytest"]


def _pytest_command(mod):
    (cmd,) = [c for c in mod.commands if _is_pytest(c)]
    return cmd[3:]


def test_the_whole_suite_runs_as_make_test_runs_it(compat):
    row = compat.run_stack("floor", compat.STACKS["floor"], compile_check=False)
    makefile = (ROOT / "Makefile").read_text()
    make_test = makefile[makefile.index("\ntest:"):].split("\n")[2]
    assert "-m pytest tests -q -p no:cacheprovider" in make_test  # what the next line compares to
    assert _pytest_command(compat) == ["tests", "-q", "-p", "no:cacheprovider"]
    assert row["tests p/f/s"] == "1100/0/12" and row["suite"] == "whole"


def test_no_option_runs_a_subset_silently(compat, capsys):
    with pytest.raises(SystemExit):
        compat.main(["--quick"])
    assert "unrecognized arguments: --quick" in capsys.readouterr().err
    row = compat.run_stack("floor", compat.STACKS["floor"], pytest_args=["-k", "attention"],
                           compile_check=False)
    assert _pytest_command(compat) == ["tests", "-q", "-p", "no:cacheprovider", "-k", "attention"]
    assert row["suite"] == "subset: -k attention"
    assert "suite" in compat.COLUMNS


def test_make_compat_passes_no_subset():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ncompat:"):].split("\n")[2]
    assert recipe.strip() == "$(PYTHON) tools/compat.py $(COMPAT_ARGS)"
