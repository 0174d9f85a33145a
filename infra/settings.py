"""
Settings from the command line, the one reader every script uses, and the error a user can fix by
changing them. It sits below everything that reads settings or raises that error.

    config = parse_settings({"lr": (1e-3, "peak learning rate")}, ["--lr=3e-4"])  # .lr == 3e-4
    config = parse_config(argv, train.SETTINGS)  # a training run: its settings + Table 8's
"""
import argparse
import difflib
import json
import sys
from types import SimpleNamespace

from configs import MODEL_SIZES, STAGES


class TrainingError(Exception):
    """A problem the user can fix (data, settings, checkpoint, a full disk, divergence): an entry
    script prints it as one line and exits with 1."""


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(
            f"expected a JSON value such as [1, 2, 4], got {text!r}") from None


def parse_settings(table, argv=None, description=None):
    """Settings from the command line as --key=value (or --key value): table maps each key to
    (default, help) or (default, help, type). The type is the default's (true/false for booleans,
    JSON for lists and dicts, text for None); a bare --flag means true. --help lists every key; an
    unknown one stops with a did-you-mean hint."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, (default, text, *kind) in table.items():
        kind = kind[0] if kind else str if default is None else type(default)
        kind = {bool: _bool, list: _json, dict: _json}.get(kind, kind)
        extra = dict(nargs="?", const=True) if kind is _bool else {}
        parser.add_argument(f"--{key}", type=kind, default=default, metavar="",
                            help=f"{text} [{default}]", **extra)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = unknown[0].split("=")[0].lstrip("-")
        close = difflib.get_close_matches(name, table, n=3)
        hint = (f"; did you mean {' or '.join('--' + k for k in close)}?" if close
                else "; --help lists them all")
        parser.error(f"unknown setting {unknown[0]!r}{hint}")
    return SimpleNamespace(**vars(args))


def parse_config(argv, settings, description=None):
    """A training run's settings: settings (name: (default, help)) plus the Table 8 values of the
    chosen --stage (configs.STAGES), each overridable as --key=value."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", default=settings["stage"][0])
    stage = first.parse_known_args(argv)[0].stage
    if stage not in STAGES:
        sys.exit(f"error: --stage={stage} is not one of: {', '.join(STAGES)} (configs/__init__.py)")
    table = {**settings,
             **{k: (v, f"Table 8 value of stage {stage}") for k, v in STAGES[stage].items()}}
    config = parse_settings(table, argv, description)
    if config.size and config.size not in MODEL_SIZES:
        sys.exit(f"error: --size={config.size} is not one of: {', '.join(MODEL_SIZES)}")
    return config
