"""``mmpt demo`` pins torch's thread count (float sums change order with it), so its figures repeat on any machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmpt.commands import demo


class Stop(Exception):
    """Raised by the stand-in trainer: the test only needs the state training starts in."""


def test_demo_trains_with_a_fixed_printed_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    seen: list[int] = []

    def train(cfg: Any) -> None:
        seen.append(torch.get_num_threads())
        raise Stop

    import mmpt.training.loop

    for var in ("MMPT_DEMO_DATA", "MMPT_RUN_DIR"):  # run_demo points recipes at its folders: restored after
        monkeypatch.setenv(var, "")
    monkeypatch.setattr(demo, "demo_data", lambda *a, **k: None)  # no data needed to reach training
    monkeypatch.setattr(mmpt.training.loop, "train", train)
    before = torch.get_num_threads()
    for threads in (1, 3):  # whatever the machine or the caller chose, training sees the same count
        torch.set_num_threads(threads)
        with pytest.raises(Stop):
            demo.run_demo(str(tmp_path / "demo"), smoke=True)
        assert torch.get_num_threads() == threads  # the caller's setting comes back
    torch.set_num_threads(before)
    assert seen == [demo.DEMO_THREADS] * 2
    assert f"{demo.DEMO_THREADS} torch threads" in capsys.readouterr().out
