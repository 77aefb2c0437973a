"""Float32 master weights for trainable parameters held in bfloat16 or float16 (mixed-precision training).

A model loaded in bfloat16 (the default on CUDA) keeps its own parameters in bfloat16. Methods that train those
parameters (full fine-tuning, LayerNorm tuning, BitFit, FishMask, the hand-written bottleneck adapters) would
otherwise add each optimizer update to a bfloat16 number: bfloat16 has 8 significant bits, so an update smaller
than half the spacing of the number it is added to is rounded away. With Adafactor's ``scale_parameter`` step
(``lr x rms(p)``, 3e-4 for a LayerNorm weight of 1.0, whose bfloat16 spacing is 2^-7 = 7.8e-3) or AdamW at 1e-5
on weights of ~0.05 (spacing 2.4e-4) almost every update is lost and the model barely trains. (peft casts its
adapters to float32 on its own; those parameters are left as they are.)

:class:`MasterWeights` keeps a float32 copy of each low-precision trainable parameter; the optimizer steps on the
copies (gradients converted to float32 first, so clipping and the update are computed in float32) and the model's
parameter is then set to its copy, rounded once. float32 parameters are used directly, so float32 training is
exactly what it was without this class.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """The optimizer's view of ``params``: float32 masters for low-precision ones, the parameters themselves else.

    Per step: ``backward()`` -> :meth:`pull_grads` -> clip and ``optimizer.step()`` on :attr:`params` ->
    :meth:`push`.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model parameter, its float32 master)
        self.params: list[torch.Tensor] = []  # what the optimizer holds, in the order of ``params``
        for p in params:
            if p.dtype in LOW_PRECISION:
                master = torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, master))
                self.params.append(master)
            else:
                self.params.append(p)

    @property
    def active(self) -> bool:
        """Whether any parameter has a float32 master (the run's numbers differ from plain low-precision steps)."""
        return bool(self.pairs)

    def pull_grads(self) -> None:
        """Move the model parameters' gradients to their masters, as float32."""
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """Set each model parameter to its updated master (one rounding to the parameter's dtype)."""
        for p, master in self.pairs:
            p.copy_(master)

    def zero_grad(self) -> None:
        """Drop the gradients of the model parameters and of the masters."""
        for p, master in self.pairs:
            p.grad = None
            master.grad = None
