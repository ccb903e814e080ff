"""Command-line flags derived from components' declared settings (:mod:`mtrobust_fast.registry`), and the
translation of library errors, which name API arguments, into the flags a user typed."""
import argparse

from mtrobust_fast.registry import SettingValueError, boolean


def flag(setting):
    """The flag of a declared setting: ``--name-with-dashes`` (or its declared ``flag``); ``--no-name`` for a
    boolean that is on by default (a switch that turns it off)."""
    name = "--" + (setting.flag or setting.name).replace("_", "-")
    return "--no-" + name[2:] if _off_switch(setting) else name


def _off_switch(setting):
    return setting.convert is boolean and setting.default is True


def _converter(setting):
    def convert(text):
        try:
            return setting.parse(text)
        except SettingValueError as error:
            raise argparse.ArgumentTypeError(error.reason) from None
    convert.__name__ = setting.name  # argparse names the type in some messages
    return convert


def _scope(registry, setting):
    takers = registry.takers(setting.name)
    return "" if len(takers) == len(registry) else f" [{registry.kind}: {', '.join(takers)}]"


def add_setting_flags(parser, registry, skip=()):
    """One flag per setting declared by any component of ``registry`` (``skip``: names a command spells itself).
    Flags default to None ("the component's own"); a boolean setting whose default is False is a switch that
    turns it on, one whose default is True a ``--no-...`` switch that turns it off."""
    for setting in registry.settings().values():
        if setting.name in skip:
            continue
        if setting.convert is boolean and setting.default is False:
            parser.add_argument(flag(setting), dest=setting.name, action="store_true",
                                help=setting.help + _scope(registry, setting))
        elif _off_switch(setting):
            parser.add_argument(flag(setting), dest=setting.name, action="store_const", const=False,
                                default=None, help="do not " + setting.help + _scope(registry, setting))
        else:
            shown = ",".join(f"{v:g}" for v in setting.default) if isinstance(setting.default, tuple) \
                else setting.default
            parser.add_argument(flag(setting), dest=setting.name, type=_converter(setting), default=None,
                                metavar=setting.name.upper(),
                                help=setting.help + ("" if shown is None else f" (default {shown})")
                                + _scope(registry, setting))


def add_sweep_flags(parser, registry):
    """One flag per sweep key declared by a component of ``registry``; a grid key takes comma-separated values
    (each forms its own cells), a value key the setting's own text (a boolean that is on by default: a
    ``--no-...`` switch)."""
    for setting in registry.settings().values():
        if not setting.sweep:
            continue
        if _off_switch(setting) and setting.sweep == "value":
            parser.add_argument(flag(setting), dest=setting.name, action="store_const", const="false", default=None,
                                help="do not " + setting.help + _scope(registry, setting))
            continue
        many = setting.sweep == "grid"
        parser.add_argument(flag(setting), dest=setting.name, default=None,
                            type=(lambda text: [item.strip() for item in text.split(",")]) if many else str,
                            help=setting.help + (" (comma-separated: each value forms its own cells; 'none': the "
                                                 "attack's own)" if many else "") + _scope(registry, setting))


def given_settings(args, registry):
    """``{setting name: value}`` of every declared setting a command's flags hold (None: not given)."""
    return {name: getattr(args, name, None) for name in registry.settings()}


def flag_names(registry, renamed=None):
    """API argument name -> flag, for :func:`mtrobust_fast.cli.args.run_reporting`: the declared settings' flags
    plus a command's ``renamed`` arguments (e.g. ``{"sets": "--target"}``)."""
    return {**{name: flag(s) for name, s in registry.settings().items()}, **(renamed or {})}
