"""CPU threading defaults for long CPU runs (fine-tuning, the demo). No torch here.

On a machine whose cores are shared (CI runners, laptops running other work), OpenMP threads that spin while
waiting for each other lose their time slices to the other processes, and every parallel region waits for the
slowest thread. Measured on 2 shared cores with another process busy: one LiteMedSAM decoder training step
took 15 s with spinning threads and 2–3.5 s with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep).
"""

from __future__ import annotations

import os
import sys


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it. Only effective before torch is first imported
    (the OpenMP runtime reads it when it loads); returns whether it took effect."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True
