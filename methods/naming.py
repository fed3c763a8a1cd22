"""How config.json names a run's methods, also for runs made before the method API, and the values of the keys runs
predate. train.py (a resume compares a checkpoint's options), costs.py and the analysis (analysis.runs re-exports
these names) read recorded runs through this one module. Pure Python: the analysis imports it without torch."""

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


def api_names(options):
    """Recorded options with `methods` as the method API names them; each source (config.json, a checkpoint) is read
    on its own, since one may predate the API and the other not (a resume rewrites config.json first)."""
    if options is None or "methods" not in options:
        return options
    named = {**options, "methods": canonical_methods(options)}
    if "method_options" in options or is_legacy(options):  # (a checkpoint of 2026-12-01 morning has none)
        named["method_options"] = method_options(options)
    return named
