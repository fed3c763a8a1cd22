"""Progressive resizing (fast.ai; Composer's ProgressiveResizing defaults): train at initial_scale of the image size
early, grow it linearly to full size, and finish at full size.

The scale at progress p: initial_scale until delay_fraction, then linear up to 1 at 1 - finetune_fraction, then 1;
the side is rounded to a multiple of size_increment; images are resized with antialiased bilinear interpolation
(validation always at full size). The progress is the budget's (ctx.cycle_progress): under a cyclic schedule the
ramp repeats within each cycle (the first cycle includes the warmup), so every curve point ends its budget at full
resolution, as the standard run of that budget does; under wsd and schedule-free it runs from one curve point to
the next along the model's path. A model that cannot take the smaller images (a timm ViT without
dynamic_img_size=true) is refused before training."""
import torch
import torch.nn.functional as F

from methods.api import Method, MethodError


class ProgressiveResizing(Method):
    """--method progressive_resizing[:initial_scale=0.5,delay_fraction=0.5,finetune_fraction=0.2,size_increment=4]."""
    name, short, order = "progressive_resizing", "pr", 30
    options = {"initial_scale": 0.5, "delay_fraction": 0.5, "finetune_fraction": 0.2, "size_increment": 4}

    def __init__(self, **options):
        super().__init__(**options)
        if not (0 < self.initial_scale <= 1 and 0 <= self.delay_fraction and 0 <= self.finetune_fraction
                and self.delay_fraction + self.finetune_fraction < 1 and self.size_increment >= 1):
            raise MethodError("--method progressive_resizing: need 0 < initial_scale <= 1, delay_fraction and "
                              "finetune_fraction >= 0 with a sum < 1, size_increment >= 1")

    def scale(self, progress):
        ramp = (progress - self.delay_fraction) / (1 - self.finetune_fraction - self.delay_fraction)
        return self.initial_scale + (1 - self.initial_scale) * min(max(ramp, 0.0), 1.0)

    def size(self, side, progress):
        """The side length for an image side of `side` pixels at this progress: a multiple of size_increment below
        full size, never above it, and the image's own side at scale 1."""
        scale = self.scale(progress)
        if scale >= 1:
            return side
        return min(side, max(self.size_increment, round(side * scale / self.size_increment) * self.size_increment))

    def check(self, run):
        c, h, w = run.image_shape
        small = (self.size(h, 0.0), self.size(w, 0.0))
        model = run.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(2, c, *small, device=next(model.parameters()).device))
        except Exception as e:
            raise MethodError(f"--method progressive_resizing: {run.model_name} does not take {small[0]}x{small[1]} "
                              f"images ({type(e).__name__}); timm ViTs need --model-kwargs dynamic_img_size=true, or "
                              f"raise initial_scale") from None
        finally:
            model.train(was_training)

    def train_image_size(self, size, ctx):
        return self.size(size[0], ctx.cycle_progress), self.size(size[1], ctx.cycle_progress)

    def transform_batch(self, x, y, ctx):
        size = self.train_image_size(tuple(x.shape[-2:]), ctx)
        if size == tuple(x.shape[-2:]):
            return x, y
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False), y
