"""The optimizer of a run (--opt, --weight-decay, --decay-exclusions, schedule-free's own): built from timm's
factory with one weight-decay convention for all. options.py checks these flags (OPTIMIZERS, LAMB_VERSION)."""
import torch


def decay_exclusions(args, model):
    """--decay-exclusions resolved: auto is on iff the model has no BatchNorm (ViTs, but also ConvNeXt or NFNets),
    off for BatchNorm models, as every run before the flag."""
    if args.decay_exclusions != "auto":
        return args.decay_exclusions == "on"
    return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_optimizer(model, args, setup, plan, exclusions):
    """timm's --opt. Weight decay is decoupled and scaled by the LR in all four (lamb told to decouple it), so
    wd / peak lr makes --weight-decay the decay per step at the peak LR, wd x lr / peak lr at any other: a cyclic
    and a standard run decay alike at the same LR (torch's AdamW weight_decay = --weight-decay / --lr). With
    exclusions, biases, normalisation weights and the model's no_weight_decay() names are not decayed (timm's
    param_groups_weight_decay). Schedule-free: SGDScheduleFree (weight decay its L2 term, unscaled, as the study
    ran it) or AdamWScheduleFree (the convention above, at its own peak LR); their own warmup."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    betas = dict(betas=tuple(args.opt_betas)) if args.opt_betas else {}
    betas.update(eps=args.opt_eps) if args.opt_eps else None
    if args.schedule != "schedule-free":
        extra = dict(momentum=args.momentum, nesterov=args.nesterov) if args.opt == "sgdw" else betas
        if args.opt == "lamb":  # timm's Lamb clips gradients to 1.0, couples its decay to the trust ratio and takes
            # the ratio only where decayed (plain Adam elsewhere) unless told: --clip-grad, one decay convention and
            # the ratio on every parameter (options.LAMB_VERSION 2) instead
            extra.update(max_grad_norm=None, decoupled_decay=True, always_adapt=True)
        return create_optimizer_v2(model if exclusions else model.parameters(), opt=args.opt, lr=args.lr,
                                   weight_decay=args.weight_decay / args.lr, filter_bias_and_bn=exclusions, **extra)
    import schedulefree  # resolve() checked it is installed
    no_decay = getattr(model, "no_weight_decay", set)()  # a ViT's position embedding, as the factory spares it
    # AdamW decays by lr x wd per step: wd / its peak LR, as for every --opt; SGD's L2 term as the study ran it
    wd = args.weight_decay / setup.sf_lr if args.opt == "adamw" else args.weight_decay
    params = (param_groups_weight_decay(model, wd, no_weight_decay_list=no_decay) if exclusions
              else model.parameters())
    if args.opt == "adamw":
        optimizer = schedulefree.AdamWScheduleFree(params, lr=setup.sf_lr, weight_decay=wd,
                                                   warmup_steps=plan.warmup_steps, **betas)
    else:
        optimizer = schedulefree.SGDScheduleFree(params, lr=setup.sf_lr, momentum=args.momentum, weight_decay=wd,
                                                 warmup_steps=plan.warmup_steps)
    optimizer.train()
    return optimizer


def weight_decay_note(args):
    """A warning where --weight-decay is surely meant as torch's AdamW's (0.05 is 0.05 x lr per step here), or None."""
    if args.opt != "sgdw" and args.weight_decay / args.lr > 1:
        return (f"warning: --weight-decay {args.weight_decay:g} is the decay per step at the peak LR: {args.opt} will "
                f"shrink the weights by {args.weight_decay:.0%} a step (torch's AdamW weight_decay w is --weight-decay "
                f"w x --lr here)")
    return None
