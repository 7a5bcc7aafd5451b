"""Sharpness-Aware Minimisation (Foret et al., 2021) around any torch optimiser.

One SAM update takes two gradient evaluations on the same batch:

1. the gradient g at the weights w; the weights move to the nearby worst case
   ``w + rho * g / ||g||`` (ASAM: element-wise scaled by |w|, Kwon et al., 2021);
2. the gradient at the perturbed weights; the weights return to w and the base optimiser steps
   with that second gradient.

Usage::

    loss = compute_loss(batch); loss.backward()
    sam.perturb()                       # w -> w + e, clears gradients
    compute_loss(batch).backward()
    sam.step()                          # w + e -> w, base optimiser step, clears gradients
"""
import torch


class SAM:
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eta=0.01):
        if rho < 0:
            raise ValueError("rho must be non-negative, not %r" % rho)
        self.params = [p for p in params if p.requires_grad]
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta  # keeps ASAM's scale away from zero for zero-valued weights
        self._saved_weights = None

    def _scale(self, p):
        return p.abs() + self.eta if self.adaptive else torch.ones_like(p)

    @torch.no_grad()
    def gradient_norm(self):
        norms = [(self._scale(p) * p.grad).norm(2) for p in self.params if p.grad is not None]
        return torch.norm(torch.stack(norms), 2) if norms else torch.tensor(0.0)

    @torch.no_grad()
    def perturb(self):
        """Move the weights to ``w + rho * T^2 g / ||T g||`` (T = I for SAM) and clear gradients."""
        if self._saved_weights is not None:
            raise RuntimeError("perturb() called twice without step()")
        factor = self.rho / (self.gradient_norm() + 1e-12)
        self._saved_weights = []
        for p in self.params:
            if p.grad is None:
                self._saved_weights.append(None)
                continue
            self._saved_weights.append(p.detach().clone())
            scale = self._scale(p)
            p.add_(scale * scale * p.grad * factor)
            p.grad = None

    @torch.no_grad()
    def restore(self):
        """Undo :meth:`perturb`: the weights return bit-exactly to w."""
        if self._saved_weights is None:
            return
        for p, saved in zip(self.params, self._saved_weights):
            if saved is not None:
                p.copy_(saved)
        self._saved_weights = None

    def step(self, clip_norm=None):
        """Restore the weights, optionally clip the (sharpness-aware) gradient by its total norm
        (scaling keeps its direction), then step the base optimiser."""
        self.restore()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, clip_norm)
        self.base_optimizer.step()
        self.base_optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        return {"base_optimizer": self.base_optimizer.state_dict(), "rho": self.rho,
                "adaptive": self.adaptive}

    def load_state_dict(self, state):
        self.base_optimizer.load_state_dict(state["base_optimizer"])
