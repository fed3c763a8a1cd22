"""SAM, sharpness-aware minimisation (Foret et al. 2021): each step's gradient is taken again at the weights
moved by rho along the normalised gradient, w + rho g / ||g||, and that gradient updates w.

Two forward-backward passes per step, so twice the compute: the time axis shows it. The first pass is the loop's
own (all micro-batches, all-reduced under DDP), so the perturbation uses the whole step's gradient, and the second
reruns the same micro-batches with the same draws of the key-seeded batch transforms (MixUp, CutMix, a plug-in's
ctx.generator; dropout and drop-path masks, drawn from the global RNG, differ between the passes). Under fp16 the gradients carry the GradScaler's
scale, which cancels out of g / ||g||; a non-finite first gradient perturbs nothing (the step is plain SGD, or the scaler
skips it). BatchNorm statistics come from the first pass only (the second's are put back). The loss logged is the
first pass's, at the unperturbed weights. Other methods' before_step hooks ordered before SAM's 70 see (and may edit)
the first gradient, the one SAM perturbs along; the update uses the second, which the hooks ordered after 70 see."""
import torch

from methods.api import Method, MethodError


class SAM(Method):
    """--method sam[:rho=0.05]."""
    name, order, options = "sam", 70, {"rho": 0.05}
    recomputes_gradient = True  # a before_step ordered before 70 edits the gradient perturbed along, not the update's

    def __init__(self, **options):
        super().__init__(**options)
        if not self.rho > 0:
            raise MethodError(f"--method sam: rho must be > 0, got {self.rho}")

    def before_step(self, model, optimizer, ctx):
        params = [p for p in model.parameters() if p.grad is not None]
        # rho g / ||g||: fp16's loss scale cancels out of it, so the scaled gradients serve as they are
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in params]  # none: an earlier hook dropped them
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        factor = self.rho / (norm + 1e-12)
        kept = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in model.buffers()]
        with torch.no_grad():  # where() rather than a product: an inf gradient would make 0 x inf = nan
            for p in params:
                p.add_(torch.where(torch.isfinite(norm), p.grad * factor.to(p.grad.dtype), 0.0))
        optimizer.zero_grad(set_to_none=True)
        ctx.forward_backward()
        with torch.no_grad():
            for p, w in zip(params, kept):
                p.copy_(w)
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
