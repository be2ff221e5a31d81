"""The random-initialisation floor: a backbone evaluated as initialised. Every method must clear it."""
from __future__ import annotations

from pipeline.methods.base import Method
from pipeline.methods.registry import register


@register("random")
class RandomInit(Method):
    TRAINS = False
    LOSS_TERMS = 0

    def forward(self, batch):
        raise RuntimeError("the random-init floor is never trained")
