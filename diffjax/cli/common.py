"""What every command shares: one flag style, config files and their overrides, error handling.

Flag style: `--snake_case`, the spelling of the config fields that `--config.train.batch_size=8`
sets and of guided-diffusion's scripts (`--batch_size`, `--num_samples`, `--classifier_scale`),
so a flag reads the same wherever it appears; the `--dashed-form` is accepted as an alias of
every flag. Every option is in `--help`.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import pathlib
import sys
import traceback
from collections.abc import Callable

import ml_collections

from diffjax import cpu_flags
from diffjax.core import fields
from diffjax.io.torch_pt import CheckpointError


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, descriptions kept as written."""


def parser(prog: str, description: str, training: bool = False) -> argparse.ArgumentParser:
    """A command's parser, with the process-level options every command shares (applied by
    diffjax.cli.main before the command runs: see `process_options`); `training`: the command
    trains (its CPU flag default differs)."""
    p = argparse.ArgumentParser(prog=f"python -m diffjax {prog}", description=description,
                                formatter_class=Formatter)
    flag(p, "xla_cpu_flags", choices=sorted(cpu_flags.FLAG_SETS),
         default=cpu_flags.default(training),
         help="XLA:CPU flag set of this process (diffjax.cpu_flags): onednn = convolutions and "
              "matrix products through oneDNN (faster here on CPU); xla = XLA's defaults")
    return p


def process_options(argv: list[str], training: bool = False) -> None:
    """Apply the process-level options of a command line before anything starts JAX: the XLA:CPU
    flag set (`--xla_cpu_flags NAME`, default cpu_flags.default(training)). A command run
    in-process after JAX has started (from Python) keeps the running flags unless it names a set,
    which is then an error (cpu_flags.use says why)."""
    # Read as the command's own parser reads it (aliases, abbreviations, `=`); the set's name
    # is checked by cpu_flags.use, so that a bad one raises there.
    options = argparse.ArgumentParser(prog="python -m diffjax", add_help=False)
    flag(options, "xla_cpu_flags", default=None)
    name = options.parse_known_args(argv)[0].xla_cpu_flags
    if name is not None or not cpu_flags.started():
        cpu_flags.use(cpu_flags.default(training) if name is None else name)


def flag(group, name: str, **kwargs):
    """--name (snake_case) with --name-with-dashes as an alias."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return group.add_argument(*names, **kwargs)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> its get_config(arg)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {spec!r}: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"_diffjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _literal(text: str):
    if text.strip().lower() in ("nan", "inf", "+inf", "-inf"):
        return float(text)  # so that the settings' finiteness checks name the value
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain string


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str],
                    schema: Callable[[tuple, ml_collections.ConfigDict], list | None] | None = None
                    ) -> ml_collections.ConfigDict:
    """`--config.a.b=value` (or `--config.a.b value`) overrides. A key is valid when the config
    has it or `schema(path, config)` lists it (a field left at its default); any other key is an
    error naming the closest one. A value is a Python literal (nan / inf are floats; a string
    otherwise); a tuple or list replaces the old value whole."""
    config = ml_collections.ConfigDict(config.to_dict())
    i = 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--config."):
            raise ValueError(f"unrecognised argument {item!r}: overrides look like "
                             f"--config.train.batch_size=8 (see --help)")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise ValueError(f"{item} needs a value, e.g. {item}=8")
            value, i = overrides[i + 1], i + 1
        i += 1
        *parents, leaf = key.split(".")
        node, path = config, ()
        for part in (*parents, leaf):
            where = ".".join(path) or "the config"
            if part not in node:
                known = (schema(path, config) if schema else None) or []
                fields.check_keys(where, [part], dict.fromkeys([*node.keys(), *known]))
                if part != leaf:
                    node[part] = ml_collections.ConfigDict()
            if part != leaf:
                node, path = node[part], (*path, part)
                if not isinstance(node, ml_collections.ConfigDict):
                    raise ValueError(f"--config.{key}: {'.'.join(path)} is not a section")
        old, new = node.get(leaf), _literal(value)
        if isinstance(old, (tuple, list)) and not isinstance(new, (tuple, list)):
            new = (new,)
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            new = float(new)
        try:
            node[leaf] = new
        except TypeError as err:
            raise ValueError(f"--config.{key}={value!r}: {err}") from None
    return config


USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, CheckpointError)


def run(main, argv=None) -> int:
    """Run a command's main; a user error (or any failure) is one `error:` line and a non-zero
    exit, never a traceback (set DIFFJAX_TRACEBACK=1 to see it)."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        if os.environ.get("DIFFJAX_TRACEBACK"):
            traceback.print_exc()
        return 2
    except Exception as err:  # noqa: BLE001 - one line for the user, the details on request
        print(f"error: {type(err).__name__}: {err}\n(an unexpected failure: rerun with "
              f"DIFFJAX_TRACEBACK=1 for the traceback, and report it)", file=sys.stderr)
        if os.environ.get("DIFFJAX_TRACEBACK"):
            traceback.print_exc()
        return 1
