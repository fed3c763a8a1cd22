"""Per-step overheads of train.py's step, A/B: the optimizer's implementation and timm's fused attention.

    python -m benchmarks.overheads [the options of benchmarks.throughput: --model, --model-kwargs, --opt, --amp,
                                    --clip-grad, --batch-size, --steps, --rounds, --method ..., --json FILE]

Times train.py's training step (benchmarks.throughput's (a): one fixed batch of real images, the methods' hooks)
with each candidate, interleaved over --rounds rounds (A B C C B A ...: a drifting machine slows all alike), and
gives each one's images/s and its ratio to train.py as it is (`default`), taken round by round, as medians with
distribution-free intervals. Candidates: `foreach` (the optimizer's multi-tensor implementation: on a CPU torch's
AdamW and timm's SGDW default to a loop over the parameters), `fused` (torch's one-kernel AdamW/Adam/SGD, CPU
included since torch 2.4; not timm's SGDW), and `unfused_attention` (timm's attention by hand instead of
F.scaled_dot_product_attention, which timm uses by default; ViTs only). A candidate is worth a change in train.py
only where its interval lies above 1 on the machine that trains.
"""
import json

import torch

from analysis.stats import median_ci
from benchmarks.throughput import ci_text, make_step, parser, prepare, summary, timed
from methods import weights_kept


def attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


def candidates(model, opt):
    """{name: (optimizer group options, fused attention)} that apply to this model and optimizer."""
    out = {"default": ({}, True), "foreach": ({"foreach": True}, True)}
    if opt.__class__.__module__.startswith("torch.optim") and "fused" in opt.defaults:
        out["fused"] = ({"fused": True, "foreach": False}, True)
    if attention_modules(model):
        out["unfused_attention"] = ({}, False)
    return out


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    a = p.parse_args(argv)
    methods, device, amp, model, optimizer_flags, x, y = prepare(p, a)
    default = make_step(model, methods, amp, device, optimizer_flags, a.steps, clip_grad=a.clip_grad)
    tried = candidates(model, default.optimizer)
    steps = {"default": default}
    for name, (group_options, _) in list(tried.items())[1:]:
        steps[name] = make_step(model, methods, amp, device, optimizer_flags, a.steps, clip_grad=a.clip_grad)
        for group in steps[name].optimizer.param_groups:  # before the first step: it makes the state to suit
            group.update(group_options)
    rates = {name: [] for name in steps}
    for r in range(a.rounds):  # A B C, then C B A: no candidate always runs after another
        for name, step in list(steps.items())[::1 if r % 2 == 0 else -1]:
            for m in attention_modules(model):
                m.fused_attn = tried[name][1]
            with weights_kept(model):  # each from the same weights
                rates[name].append(timed(step, iter(lambda: (x, y), None), a.steps, 5 if r == 0 else 1)[0])
    for m in attention_modules(model):
        m.fused_attn = True
    out = dict(model=a.model, model_kwargs=a.model_kwargs, opt=a.opt, amp=amp, batch_size=a.batch_size,
               clip_grad=a.clip_grad, methods=methods.specs, rounds=a.rounds, steps=a.steps,
               threads=torch.get_num_threads(), images_per_s={k: summary(v) for k, v in rates.items()},
               over_default={k: summary([c / d for c, d in zip(v, rates["default"])]) for k, v in rates.items()})
    print(f"{a.model} {a.model_kwargs} --opt {a.opt} --amp {amp}, batch {a.batch_size}, {torch.get_num_threads()} "
          f"threads; medians over {a.rounds} interleaved rounds"
          + (f" [{100 * median_ci(rates['default'])[3]:.0f} % interval]" if a.rounds > 1 else ""))
    for name in steps:
        print(f"{name:>18}: {ci_text(out['images_per_s'][name]):>22} img/s   x default "
              f"{ci_text(out['over_default'][name], '.3f')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
