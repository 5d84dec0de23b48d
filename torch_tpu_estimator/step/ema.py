"""An exponential moving average of a module's weights, kept on its device
(UpdateConfig(ema_decay)); evaluate, predict and export may use it instead of the weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ExponentialMovingAverage:
    """A moving average of a module's weights on its device: floating tensors are averaged
    (ema += (1 - decay) * (weights - ema)), other buffers copied; one foreach op a step."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.shadow = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}

    def reset(self) -> None:
        """Starts the average at the module's current weights (restored or warm-started)."""
        with torch.no_grad():
            for name, tensor in self.module.state_dict().items():
                self.shadow[name].copy_(tensor)

    def update(self) -> None:
        current = self.module.state_dict()
        floating = [name for name, tensor in self.shadow.items() if tensor.is_floating_point()]
        with torch.no_grad():
            torch._foreach_lerp_([self.shadow[name] for name in floating],
                                 [current[name].detach() for name in floating], 1.0 - self.decay)
            for name, tensor in self.shadow.items():
                if not tensor.is_floating_point():
                    tensor.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(f"the checkpoint's EMA holds {sorted(state)}, the model "
                             f"{sorted(self.shadow)}")
        with torch.no_grad():
            for name, tensor in self.shadow.items():
                if state[name] is not tensor:  # a sharded EMA is read into the shadow in place
                    tensor.copy_(state[name])
