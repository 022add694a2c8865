"""The exponential moving average of a model's weights that fastmnist evaluates and saves."""
import copy

import torch


class WeightAverage:
    """An exponential moving average of a model's parameters and floating-point buffers (BN statistics).

    After update n the average moves towards the model by 1 - d, with
    d = min(decay, (1 + n) / (10 + n)): the warm-up lets the average follow
    the fast early changes instead of clinging to the random initial weights,
    so it is already the better model after one short epoch. Integer buffers
    (BN's batch counter) are copied. torch.optim.swa_utils.AveragedModel has no
    such warm-up, which is why this small class exists. The averaged BN
    statistics belong to the weights of the last ~1/(1 - decay) steps, not to
    the averaged weights; a recipe's bn_recompute_batches replaces them before
    each evaluation (train.recompute_bn_statistics).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged = list(self.module.parameters()) + list(self.module.buffers())
        current = list(model.parameters()) + list(model.buffers())
        for avg, cur in zip(averaged, current, strict=True):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:
                avg.copy_(cur)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if state["decay"] != self.decay or not isinstance(state["updates"], int) or state["updates"] < 0:
            raise ValueError(f"decay {state['decay']!r} and {state['updates']!r} updates do not fit decay {self.decay}")
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
