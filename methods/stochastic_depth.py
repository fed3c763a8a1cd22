"""Stochastic depth (Huang et al. 2016): each residual block's branch is dropped per sample with a probability that
grows linearly with depth up to `rate` (timm's drop_path_rate), and the kept ones rescaled. For timm models it is
their drop_path_rate option; the small ResNet has it too."""
from timm.layers import DropPath

from methods.api import Method, MethodError


class StochasticDepth(Method):
    """--method stochastic_depth[:rate=0.1]."""
    name, short, options = "stochastic_depth", "sd", {"rate": 0.1}

    def __init__(self, **options):
        super().__init__(**options)
        if not 0 < self.rate < 1:
            raise MethodError(f"--method stochastic_depth: rate must be in (0, 1), got {self.rate}")

    def model_kwargs(self):
        return {"drop_path_rate": self.rate}

    def apply_model(self, model):
        if not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules()):
            self.no_effect = "the model has no drop-path layer"
        return model
