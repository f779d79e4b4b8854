"""The `fedlite` command: subcommands that import only what they need."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("fedlite.model_export.cli", "export a trainable TFLite model and its int8 inference model"),
    "agent": ("fedlite.agent.cli", "run the device agent"),
    "aggregator": ("fedlite.aggregator.cli", "run the aggregator for one federation"),
    "broker": ("fedlite.broker_config.cli", "broker configuration: init, enrol devices, make test certificates"),
    "dashboard": ("fedlite.dashboard.cli", "the operator's web dashboard for a federation"),
    "model": ("fedlite.aggregator.model_cli", "the model registry: list, show, promote, rollback"),
    "keys": ("fedlite.keys_cli", "the aggregator's signing keys: generate, show"),
    "demo": ("fedlite.demo.cli", "a complete federated training run on this machine"),
    "simulate": ("fedlite.demo.simulate_cli", "load-test rounds with many virtual agents"),
    "new": ("fedlite.demo.new_cli", "write a ready project: Keras model, data hook, configs, systemd drop-ins"),
}


# what `fedlite[server]` adds to an agent's install (pyproject.toml)
SERVER_PACKAGES = {"tensorflow", "prometheus_client", "sklearn", "matplotlib", "dp_accounting", "starlette",
                   "uvicorn"}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless there is none to show (None, False, "") or it names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if "default" in help_.lower() or default is None or default is False or default in ("", argparse.SUPPRESS):
            return help_
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help_  # a required positional: its default is never used
        return f"{help_} (default: %(default)s)"


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `fedlite <name>`, its subcommands' parsers formatted alike."""
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fedlite {name}", description=SUBCOMMANDS[name][1],
                                     formatter_class=DefaultsHelpFormatter)
    module.add_arguments(parser)
    for sub in subparsers(parser):
        sub.formatter_class = DefaultsHelpFormatter
    return parser


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (subcommands, their subcommands, ...)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                found += [sub, *subparsers(sub)]
    return found


def _usage() -> str:
    lines = ["usage: fedlite <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from fedlite import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fedlite: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        parser = build_parser(name)
        args = parser.parse_args(rest)
        return int(importlib.import_module(SUBCOMMANDS[name][0]).run(args) or 0)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in SERVER_PACKAGES:
            raise
        print(f"fedlite {name}: needs {root}, which this install does not have (an agent-only install): "
              "pip install 'fedlite[server]'", file=sys.stderr)
        return 2  # a configuration of the machine: systemd's units do not restart on 2


if __name__ == "__main__":
    sys.exit(main())
