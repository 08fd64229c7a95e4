"""Keras's RMSprop: epsilon inside the square root.

    v <- rho * v + (1 - rho) * g^2
    w <- w - lr * g / sqrt(v + eps)          (eps_inside_root=True, Keras 2.15)
    w <- w - lr * g / (sqrt(v) + eps)        (eps_inside_root=False, torch.optim.RMSprop)

torch.optim.RMSprop has only the second form; no torch eps reproduces the first.
"""
from __future__ import annotations

import torch


class RMSprop(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-7,
                 eps_inside_root: bool = True, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or not 0 <= rho < 1:
            raise ValueError(f"invalid RMSprop hyperparameters lr={lr} rho={rho} eps={eps}")
        defaults = dict(lr=lr, rho=rho, eps=eps, eps_inside_root=eps_inside_root, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            avgs = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                avgs.append(state["square_avg"])
            # One fused kernel per op over all tensors: the optimizer is off the per-tensor Python path.
            torch._foreach_mul_(avgs, group["rho"])
            torch._foreach_addcmul_(avgs, grads, grads, value=1 - group["rho"])
            if group["eps_inside_root"]:
                denom = torch._foreach_sqrt(torch._foreach_add(avgs, group["eps"]))
            else:
                denom = torch._foreach_add(torch._foreach_sqrt(avgs), group["eps"])
            torch._foreach_addcdiv_(params, grads, denom, value=-group["lr"])
        return loss
