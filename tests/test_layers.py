"""The layer contracts hold (import-linter, imports inside functions included), and the check can fail:
an import pointing up a layer, or a cycle inside one, is reported with the module and line."""

from __future__ import annotations

from pathlib import Path

from lint_imports import lint


def test_layers_and_no_cycles() -> None:
    res = lint()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "KEPT" in res.stdout and "0 import cycle(s)" in res.stdout


def test_an_upward_import_inside_a_function_fails() -> None:
    def edit(tree: Path) -> None:
        batch = tree / "mmpt" / "contracts" / "batch.py"
        batch.write_text(batch.read_text() + "\n\ndef _sneaky():\n    from mmpt.training import loop  # noqa\n")

    res = lint(edit=edit)
    assert res.returncode != 0
    assert "mmpt.contracts is not allowed to import mmpt.training" in res.stdout


def test_a_cycle_within_one_layer_fails() -> None:
    def edit(tree: Path) -> None:
        for name, other in (("shards", "loader"), ("loader", "shards")):
            f = tree / "mmpt" / "data" / f"{name}.py"
            f.write_text(f.read_text() + f"\n\ndef _loop():\n    from mmpt.data import {other}  # noqa\n")

    res = lint(edit=edit)
    assert res.returncode != 0
    assert "import cycle: mmpt.data.loader <-> mmpt.data.shards" in res.stdout
