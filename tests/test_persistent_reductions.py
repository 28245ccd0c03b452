"""Which compiled variant an fp8 elementwise kernel runs, and the Inductor hook behind the
persistent one (its kernels are Triton, so what they compute is checked on the GPU:
tests/gpu/test_fp8.py)."""

import pytest
from torch._inductor.virtualized import V

from engine import fp8_linear
from engine.persistent_reductions import persistent_reductions


@pytest.mark.parametrize(("m", "variant"), [(1, "split"), (63, "split"), (64, "loop"),
                                            (255, "loop"), (256, "persistent"),
                                            (8192, "persistent")])
def test_variant_by_rows(m, variant, monkeypatch):
    monkeypatch.delenv("PDSERVE_FP8_PERSISTENT", raising=False)
    assert fp8_linear._variant(m) == variant


def test_persistent_variant_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PDSERVE_FP8_PERSISTENT", "0")
    assert fp8_linear._variant(8192) == "loop"
    assert fp8_linear._variant(8) == "split"


def test_the_hook_is_installed_only_inside_the_context():
    before = type(V.choices)
    with persistent_reductions(16384):
        assert type(V.choices).__name__ == "PersistentRows"
    assert type(V.choices) is before
