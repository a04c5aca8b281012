"""The twelve checks of the model (``CHECKS``, M1-M12) and the five of its training data
(``DATA_CHECKS``, D1-D5), found by id. Each takes the ``probe.Context`` and returns its
findings (adding to ``ctx.notes`` what it could not probe); ``doctor`` runs them in id
order. Grouped by what they look at:

- ``gradients``: what trains and where gradients land (M1, M12);
- ``identity``: identity at init (M2, M8);
- ``lora``: the LoRA formula, targets, rank and merging (M3, M4, M5, M6);
- ``inputs``: the input side of prompts and prefixes (M7, M11);
- ``optimizer``: learning rates (M9);
- ``files``: checkpoints (M10);
- ``data``: the batch's labels and the chat template (D1-D5).
"""

from __future__ import annotations

from collections.abc import Callable

from ..probe import Context
from ..report import Finding
from .data import check_d1, check_d2, check_d3, check_d4, check_d5
from .files import check_m10
from .gradients import check_m1, check_m12
from .identity import check_m2, check_m8
from .inputs import check_m7, check_m11
from .lora import check_m3, check_m4, check_m5, check_m6
from .optimizer import check_m9

Check = Callable[[Context], list[Finding]]

CHECKS: dict[str, Check] = {
    "M1": check_m1, "M2": check_m2, "M3": check_m3, "M4": check_m4, "M5": check_m5, "M6": check_m6,
    "M7": check_m7, "M8": check_m8, "M9": check_m9, "M10": check_m10, "M11": check_m11, "M12": check_m12,
}

DATA_CHECKS: dict[str, Check] = {"D1": check_d1, "D2": check_d2, "D3": check_d3, "D4": check_d4, "D5": check_d5}

__all__ = ["CHECKS", "DATA_CHECKS", "Check"]
