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
    gc.unfreeze()
    kept = [[i] for i in range(10)]  # alive before the call: out of the collector's scans after
    assert any(o is kept for o in gc.get_objects())
    tune_interpreter()
    assert not any(o is kept for o in gc.get_objects())  # frozen: in no generation it scans
    assert gc.get_freeze_count() > 0
    after = [[0]]  # made later: scanned as usual
    assert any(o is after for o in gc.get_objects())


def test_switch_interval_from_the_environment(restore_interpreter, monkeypatch):
    monkeypatch.setenv("PDSERVE_GIL_SWITCH_MS", "0.25")
    tune_interpreter()
    assert sys.getswitchinterval() == pytest.approx(0.25e-3)
