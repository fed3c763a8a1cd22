"""The registry of methods: built-ins and plug-ins, `--method NAME[:key=value,...]`, and the old flags as aliases.

A plug-in is a Python file given with --plugins FILE.py: every Method subclass defined in it with a `name`
registers under that name; its file's SHA-256 is recorded in config.json (`plugins`), so that a run of a changed
plug-in is neither resumed nor averaged with the old one's runs."""
import hashlib
import importlib.util
import math
import os
import re
import sys

from methods.api import Method, MethodError, MethodList, own_short

REGISTRY = {}  # name -> Method subclass
SOURCES = {}  # name -> "sha256:<hex>" of the plug-in file that defined it (built-ins: absent)
LOADED = {}  # (path, digest) -> the names a plug-in file registered: a file loaded again is not imported again
ALIAS_KEYS = {}  # method name -> the options its alias flags add (label_smoothing, ...): its config() may record them
RESERVED = {"baseline"}  # words that name no method: a sweep's set of none


def register(cls, source=None):
    """Add a Method subclass under cls.name; a second class of the same name is refused."""
    if not (isinstance(cls.name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", cls.name)):
        raise MethodError(f"method class {cls.__name__}: name must be a word (letters, digits, _ or -), got "
                          f"{cls.name!r}")
    for key, default in cls.options.items():
        if not isinstance(default, (bool, int, float, str)):
            raise MethodError(f"method {cls.name}: option {key}'s default must be a bool, int, float or str")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise MethodError(f"--plugins: method '{cls.name}' is defined twice ({REGISTRY[cls.name].__module__} and "
                          f"{cls.__module__}); rename one")
    reserved = RESERVED & {cls.name, own_short(cls)}
    if reserved:  # launch.sh's --methods baseline is the set of no method
        where = getattr(sys.modules.get(cls.__module__), "__file__", cls.__module__)
        raise MethodError(f"--plugins: method '{cls.name}' in {where} is named '{reserved.pop()}', the word for no "
                          f"method (launch.sh's --methods baseline); rename it")
    for other in REGISTRY.values():  # one word, two methods: `--method mx` (launch.sh's `--methods mx`) and the run
        clash = {cls.name, own_short(cls)} & {other.name, own_short(other)} - {None}  # folders' labels would mix them
        if other is not cls and clash:
            word = clash.pop()
            mine = "is named" if word == cls.name else "has the short name"
            theirs = "name" if word == other.name else "short name"
            where = getattr(sys.modules.get(cls.__module__), "__file__", cls.__module__)
            raise MethodError(f"--plugins: method '{cls.name}' in {where} {mine} '{word}', already method "
                              f"{other.name}'s {theirs} (--method {word} and launch.sh's --methods {word} mean "
                              f"{other.name}); rename it")
    REGISTRY[cls.name] = cls
    if source:
        SOURCES[cls.name] = source
    return cls


def load_plugins(paths):
    """Import each file and register the Method subclasses it defines; returns their names."""
    names = []
    for path in paths or []:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise MethodError(f"--plugins: no file {path}")
        with open(path, "rb") as f:
            digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        if (path, digest) in LOADED:
            names += LOADED[(path, digest)]
            continue
        module_name = "plugin_" + hashlib.sha1(f"{path}{digest}".encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses, pickling and typing look their module up there
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # a user's file: say which and why, in one line
            del sys.modules[module_name]
            raise MethodError(f"--plugins: {path} failed to import: {type(e).__name__}: {e}") from None
        found = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Method)
                 and c.__module__ == module_name and c.name]
        if not found:
            raise MethodError(f"--plugins: {path} defines no Method subclass with a name")
        for cls in found:
            register(cls, digest)
        LOADED[(path, digest)] = [cls.name for cls in found]
        names += LOADED[(path, digest)]
    return names


def parse_value(method, key, default, raw):
    """`raw` as the type of the option's default; MethodError names the method and the option."""
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        return raw
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a finite number"}[type(default)]
        raise MethodError(f"--method {method}: {key}={raw} must be {kind}") from None


def build(text):
    """A Method from 'name' or 'name:key=value,...'."""
    name, _, rest = text.strip().partition(":")
    name = next((n for n, c in REGISTRY.items() if own_short(c) == name), name)  # mx = mixup, as launch.sh reads it
    if name not in REGISTRY:
        raise MethodError(f"--method: unknown method '{name}'; built in: {', '.join(sorted(REGISTRY))} (a method of "
                          f"your own: --plugins FILE.py)")
    cls, options = REGISTRY[name], {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = (p.strip() for p in item.partition("="))
        if not sep:
            raise MethodError(f"--method {name}: '{item}' is not key=value; e.g. --method {name}:"
                              f"{next(iter(cls.options), 'key')}=...")
        if key not in cls.options:
            raise MethodError(f"--method {name}: unknown option '{key}'; {name} takes "
                              f"{', '.join(cls.options) or 'no options'}")
        if key in options:
            raise MethodError(f"--method {name}: {key} is given twice")
        options[key] = parse_value(name, key, cls.options[key], raw)
    return cls(**options)


def add_flags(parser):
    """--method and --plugins, and each built-in's own alias flags (--blurpool, --label-smoothing, ...)."""
    g = parser.add_argument_group("methods (docs/methods.md; a method of your own: --plugins FILE.py)")
    g.add_argument("--method", action="append", default=[], metavar="NAME[:K=V,...]",
                   help=f"a training method, repeatable; built in: {', '.join(sorted(REGISTRY))}")
    g.add_argument("--plugins", dest="plugin_files", action="append", default=[], metavar="FILE.py",
                   help="load the Method subclasses defined in FILE.py (repeatable)")
    for cls in sorted(REGISTRY.values(), key=lambda c: c.name):
        if "add_alias_flags" in vars(cls):  # its own, never inherited: a subclass is another method
            before = {a.dest for a in parser._actions}
            cls.add_alias_flags(g)
            ALIAS_KEYS[cls.name] = {a.dest for a in parser._actions} - before


def selected(args):
    """(MethodList, {plug-in method name: its file's hash}) from --plugins, --method and the alias flags."""
    load_plugins(args.plugin_files)
    chosen = [build(text) for text in args.method]
    for cls in list(REGISTRY.values()):
        options = cls.from_alias_flags(args) if "from_alias_flags" in vars(cls) else None
        if options is not None:
            chosen.append(cls(**options))
    by_name = {}
    for m in chosen:
        if m.name in by_name and by_name[m.name].spec != m.spec:
            raise MethodError(f"--method {m.name} is given twice with other options ({by_name[m.name].spec} and "
                              f"{m.spec}); give it once")
        by_name.setdefault(m.name, m)
    methods = MethodList(list(by_name.values()))
    return methods, {m.name: SOURCES[m.name] for m in methods.all if m.name in SOURCES}
