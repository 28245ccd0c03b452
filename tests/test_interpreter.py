"""tune_interpreter: the GC freeze and the GIL switch interval every engine replica sets."""

import gc
import sys

import pytest

from serving.replica import tune_interpreter


@pytest.fixture
def restore_interpreter():
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)
    gc.unfreeze()


def test_what_lives_now_is_frozen(restore_interpreter, monkeypatch):
    monkeypatch.delenv("PDSERVE_GIL_SWITCH_MS", raising=False)
    kept = [object() for _ in range(10)]  # alive before the call: moved out of the GC's scans
    gc.unfreeze()
    tune_interpreter()
    assert gc.get_freeze_count() >= len(kept)


def test_switch_interval_from_the_environment(restore_interpreter, monkeypatch):
    monkeypatch.setenv("PDSERVE_GIL_SWITCH_MS", "0.25")
    tune_interpreter()
    assert sys.getswitchinterval() == pytest.approx(0.25e-3)
