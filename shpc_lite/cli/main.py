"""Entry point: parse flags, merge config, dispatch, and turn errors into one line + exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

# command -> (module under shpc_lite.cli, one-line help). Modules are imported only when used,
# except for their tiny ``add_arguments`` which argparse needs.
COMMANDS: dict[str, tuple[str, str]] = {
    "install": ("install", "install a module from a recipe (pulling its image, or from --sif / --from)"),
    "uninstall": ("uninstall", "remove a module version, or all versions of a module"),
    "list": ("listing", "list installed modules"),
    "show": ("show", "show a recipe and what is installed of it"),
    "discover": ("discover", "list the commands on an image's PATH (from its file tree) and add them as aliases"),
    "search": ("search", "find recipes and installed modules by name, alias, keyword or package"),
    "config": ("configcmd", "show the merged configuration and where each value came from"),
    "inspect": ("inspect", "show an installed module's SIF: header, objects, labels and env"),
    "batch": ("batch", "install, sync or follow a whole site stack from a manifest"),
    "use": ("use", "print the `module use` line for this module root"),
    "view": ("view", "named subsets of installed modules as their own module tree"),
    "doctor": ("doctor", "check the runtime, tools, module system, store and registry"),
    "resolve": ("resolve", "choose versions from registry tags and record tag + digest in the lock file"),
    "check": ("check", "compare installed and locked digests with the registry; report newer versions"),
    "import-shpc": ("import_shpc", "convert Singularity Registry HPC (shpc) container.yaml recipes"),
    "kernel": ("kernel", "Jupyter kernels that run an installed module's Python in its container"),
    "venv": ("venv", "personal venvs on the host run with a module's container Python, each with its module"),
    "clean": ("clean", "remove the layer blob cache (pulls run again from the registry); modules keep working"),
}

# Global flags that set config keys (the highest configuration layer).
CONFIG_FLAGS = {
    "root": "the module root (modules/, containers/, wrappers/ go below it)",
    "module_system": "lmod or tcl",
    "runtime": "container runtime binary the wrappers call (singularity, apptainer, ch-run, podman, "
               "podman-hpc, shifter or a path)",
    "runtime_kind": "auto (from the runtime's name), apptainer, singularity, charliecloud, podman, "
                    "podman-hpc or shifter",
    "gpu": "auto, always or never",
    "default_version": "newest or none",
}


def build_parser() -> argparse.ArgumentParser:
    from shpc_lite import __version__

    parser = argparse.ArgumentParser(
        prog="shpc-lite",
        description="Turn container images into Lmod and Tcl environment modules.",
    )
    parser.add_argument("--version", action="version", version=f"shpc-lite {__version__}")
    for key, text in CONFIG_FLAGS.items():
        parser.add_argument("--" + key.replace("_", "-"), dest=key, metavar=key.upper(), help=text)
    parser.add_argument(
        "--registry", action="append", metavar="DIR", help="extra recipe directory (repeatable), searched first"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="set any config key for this run"
    )
    parser.add_argument(
        "--user", action="store_true",
        help="use your private module tree (your data dir); images in the central root are reused",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        importlib.import_module(f"shpc_lite.cli.{module}").add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def _flags(args: argparse.Namespace) -> dict:
    from shpc_lite.config import KEYS
    from shpc_lite.errors import ConfigError

    flags = {key: getattr(args, key, None) for key in CONFIG_FLAGS}
    flags["registry"] = args.registry
    flags["user"] = args.user
    for item in args.set:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in KEYS:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a known key")
        flags[key] = value
    return flags


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, Slurm's time limit): the same clean-up as Ctrl-C, then exit 143."""


# What an interrupted run exits with: 128 + the signal number, as a shell reports it.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _terminate_like_interrupt() -> None:
    """SIGTERM runs the same clean-up as Ctrl-C (the KeyboardInterrupt unwinding)."""
    import signal

    def handler(signum, frame):
        raise Terminated

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use)
        pass


def _fail(message: str) -> None:
    """The one line a failed run prints (through the scrubbed stderr), with no line breaks or
    terminal escapes from whatever text (a tag, a label, a registry's message) it quotes."""
    from shpc_lite.scrub import printable

    print(f"shpc-lite: error: {printable(' '.join(message.split()))}", file=sys.stderr)


def _innermost_frame(err: BaseException) -> str:
    """``module:line`` of the deepest shpc_lite frame of ``err``'s traceback (where input was read)."""
    import traceback

    ours = [f for f in traceback.extract_tb(err.__traceback__) if "shpc_lite" in f.filename]
    if not ours:
        return "?"
    path = ours[-1].filename
    return f"{path[path.rindex('shpc_lite'):]}:{ours[-1].lineno}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command with every line it prints scrubbed of credentials (shpc_lite.scrub)."""
    from shpc_lite.scrub import ScrubbedStream, install_log_scrubbing

    install_log_scrubbing()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ScrubbedStream(sys.stdout), ScrubbedStream(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


def _main(argv: Optional[Sequence[str]]) -> int:
    from shpc_lite.errors import ShpcLiteError

    parser = build_parser()
    args = parser.parse_args(argv)
    _terminate_like_interrupt()
    try:
        from shpc_lite.config import load_config

        config = load_config(_flags(args))
        module = importlib.import_module(f"shpc_lite.cli.{args._module}")
        return int(module.run(args, config) or 0)
    except ShpcLiteError as err:
        _fail(str(err))
        return err.exit_code
    except KeyboardInterrupt as interrupt:
        # Clean-up ran while unwinding (worker pools are abandoned, not waited for); leave now
        # rather than wait for stalled network threads.
        print("shpc-lite: interrupted; nothing half-written was left behind", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED)
    except BrokenPipeError:
        return 141
    except RecursionError as err:
        # Known and safe: a document nested deeper than Python's parsers go (a lock file, say).
        # The readers of untrusted documents say which file; this names where it was read.
        _fail(f"input nested too deeply to read (while in {_innermost_frame(err)})")
        return 1
    except OSError as err:
        reason = err.strerror or str(err)
        _fail(f"{err.filename}: {reason}" if getattr(err, "filename", None) else reason)
        return 1
