"""persistent_reductions(max_features): a context in which torch.compile keeps whole rows of up
to `max_features` features in one Triton program (a persistent reduction).

Inductor's heuristic does so only for rows of up to 1024 features. Past that it loops over each
row once per reduction and once more for the output, so a kernel that reduces a row and then
writes it scaled (SiLU-and-mul + per-token quantization over 14336 features, RMSNorm +
quantization over 4096) reads its input from memory two or three times. With many rows (prefill)
one program per row has the whole row in registers and reads it once.

The choice is made while Inductor generates code, on the compiling thread, through Inductor's
choices handler (`V.set_choices_handler`, the hook torch/_inductor/choices.py documents); where
this torch lacks it, the context changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@functools.cache  # built once per width: the context is entered on every compiled call
def _handler(max_features: int):
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError:
        return None
    if not hasattr(V, "set_choices_handler"):
        return None

    class PersistentRows(InductorChoices):
        def should_use_persistent_reduction(self, features, *args, **kwargs) -> bool:
            if (features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel,
                                                              max_features)):
                return True
            return InductorChoices.should_use_persistent_reduction(features, *args, **kwargs)

    return V, PersistentRows()


@contextlib.contextmanager
def persistent_reductions(max_features: int) -> Iterator[None]:
    found = _handler(max_features)
    if found is None:
        yield
        return
    v, handler = found
    with v.set_choices_handler(handler):
        yield
