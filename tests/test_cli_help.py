"""Every option of every `fedlite` command and subcommand has a help text, and shows its default in --help."""

from __future__ import annotations

import argparse

import pytest

from fedlite.cli import SUBCOMMANDS, build_parser, subparsers


def parsers(name: str) -> list[argparse.ArgumentParser]:
    top = build_parser(name)
    return [top, *subparsers(top)]


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and a.help != argparse.SUPPRESS]


def shows_default(action: argparse.Action) -> bool:
    """Whether --help should show the default: not None, False or "", of an option or an optional positional."""
    default = action.default
    if default is None or default is False or default in ("", argparse.SUPPRESS):
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_option_has_a_help_text_and_shows_its_default(name: str) -> None:
    problems = []
    for parser in parsers(name):
        parser.format_help()  # every help string expands (a stray % would raise here)
        formatter = parser._get_formatter()
        for action in arguments(parser):
            what = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                problems.append(f"{what}: no help text")
                continue
            shown = formatter._expand_help(action)
            named = f"(default: {action.default})" in shown or "default" in action.help.lower()  # or in its words
            if shows_default(action) and not named:
                problems.append(f"{what}: default {action.default!r} not shown: {shown!r}")
            if not shows_default(action) and ("(default: )" in shown or "(default: None)" in shown):
                problems.append(f"{what}: shows an empty default")
    assert not problems, "\n".join(problems)


def test_a_subcommands_help_shows_defaults_and_none_is_not_a_default(capsys: pytest.CaptureFixture[str]) -> None:
    from fedlite.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["broker", "init", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1)" in out and "(default: None)" not in out and "(default: False)" not in out
