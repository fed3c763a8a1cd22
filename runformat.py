"""What a run directory's config.json means for runs made by older versions (docs/run-format.md): the keys added
since (and how a run without them ran), and the method names from before the method API. Training (resume checks,
cost keys) and analysis (grouping) both read old runs through this module; it imports nothing of the project's.
"""

# keys added after runs were made, as runs without them were run (no GPU run predates tf32)
ADDED_DEFAULTS = {"model_kwargs": {}, "tf32": False, "cooldown_version": None,  # None: wsd's first formula
                  "lamb_version": None,  # None: timm's Lamb as it comes (the trust ratio only where decayed)
                  "opt": "sgdw", "opt_betas": None, "opt_eps": None, "decay_excluded": False, "clip_grad": 0.0,
                  "plugins": {}, "augment": "standard", "decode": "cpu",
                  "image_size": 224}
# Before the method API, config.json's methods were bare names and the paper's methods kept their options in keys of
# their own; canonical_methods reads such a run as the API names it: 'name:option=value' where not the default.
LEGACY_METHOD_OPTIONS = {"label_smoothing": ("label_smoothing", "eps", 0.1), "mixup": ("mixup", "alpha", 0.2),
                         "blurpool": ("blurpool_mode", "mode", "blur-first")}


def is_legacy(config):
    """A config.json, or a checkpoint's options, written before the method API (which records `plugins`)."""
    return "plugins" not in config and "method_options" not in config


def canonical_methods(config):
    """config.json's methods as canonical specs (sorted), also for runs made before the method API."""
    if not is_legacy(config) or not isinstance(config.get("methods", []), list):
        return config.get("methods", [])  # the API's own names (or no list: a reader refuses it by name)
    out = []
    for m in config.get("methods", []):
        key, option, default = LEGACY_METHOD_OPTIONS.get(m, (None, None, None))
        value = config.get(key, default) if key else default
        out.append(m if value == default else f"{m}:{option}={value!r}" if isinstance(value, float)
                   else f"{m}:{option}={value}")
    return sorted(out)


def method_options(config):
    """{method: {option: value}} of every method the run used, defaults included; for a run from before the method
    API, what the API would have recorded for its methods (all four of the paper's had at most one option)."""
    if not is_legacy(config):
        return config.get("method_options", {})
    out = {}
    for m in config.get("methods", []) if isinstance(config.get("methods"), list) else []:
        key, option, default = LEGACY_METHOD_OPTIONS.get(m, (None, None, None))
        out[m] = {option: config.get(key, default)} if key else {}
    return out
