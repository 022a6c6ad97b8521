"""θ0: the trained parameters as the meta stage began, kept to predict with (``forget_term: anchor``,
``anchor_to: start``; ``ascent_cap_reference: start``).

Only the parameters the meta stage trains are copied (the full UNet, a subset, whatever ``params`` holds); the rest
of the UNet never moves, so the start model is the UNet with these copies swapped in by
``torch.func.functional_call`` — no second model object. Parameter names are looked up at every call: a LoRA attack
wraps the UNet's layers (``to_q`` becomes ``to_q.base_layer``) but keeps the parameter objects, so the copies are
matched by object, not by a name taken once.

Resume: the copy is taken when the objective is built, before the training loop restores a checkpoint, from the
stage's input model (after a closed-form edit, which is recomputed from it); the stage's settings fingerprint that
input, so a resumed stage anchors to the same θ0. Data parallel: the main process's copy is broadcast, so every
process holds the same θ0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaunlearn.training.parallel import SINGLE, Shard


class StartWeights:
    """A detached copy of ``params`` (parameters of ``unet``) and the UNet evaluated at it."""

    def __init__(self, unet: torch.nn.Module, params: Sequence[torch.nn.Parameter], shard: Shard = SINGLE) -> None:
        self.unet = unet
        self.params = list(params)
        self.copies = [p.detach().clone() for p in self.params]
        shard.broadcast_(self.copies)

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.copies)

    def weights(self) -> dict[str, torch.Tensor]:
        """The copies under the UNet's current parameter names."""
        names = {id(p): name for name, p in self.unet.named_parameters()}
        missing = [i for i, p in enumerate(self.params) if id(p) not in names]
        if missing:
            raise RuntimeError(f"{len(missing)} start parameters are no longer in the UNet")
        return {names[id(p)]: c for p, c in zip(self.params, self.copies)}

    def predictor(self):
        """A callable used like the UNet (``net(x_t, t, **kwargs)``) that predicts with θ0 in place of the trained
        parameters (every other parameter and buffer as the UNet holds it)."""
        weights = self.weights()

        def start_unet(*args, **kwargs):
            return torch.func.functional_call(self.unet, weights, args, kwargs)

        return start_unet
