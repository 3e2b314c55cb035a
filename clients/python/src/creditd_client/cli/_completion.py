"""Shell completion for creditctl, made from its own argument parser.

    eval "$(creditctl completion bash)"     # in ~/.bashrc
    autoload -U bashcompinit && bashcompinit && eval "$(creditctl completion bash)"   # zsh

Commands, actions, flags and the choices of a flag or an argument complete; ids do not
(they live in creditd).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator

SHELLS = ("bash", "zsh")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _paths(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """("", top), ("agency", ...), ("agency create", ...): every command path and its parser."""
    yield path, parser
    for name, child in _subcommands(parser).items():
        yield from _paths(child, f"{path} {name}".strip())


def _words(parser: argparse.ArgumentParser) -> list[str]:
    """What may follow a command path: its subcommands, flags and positional choices."""
    words = list(_subcommands(parser))
    for action in parser._actions:
        if action.option_strings:
            words += [option for option in action.option_strings if option.startswith("--")]
        elif action.choices and not isinstance(action, argparse._SubParsersAction):
            words += [str(choice) for choice in action.choices]
    return words


def _flag_choices(parser: argparse.ArgumentParser) -> Iterator[tuple[str, list[str]]]:
    for action in parser._actions:
        if action.option_strings and action.choices:
            for option in action.option_strings:
                yield option, [str(choice) for choice in action.choices]


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash (and zsh with bashcompinit) completion function for `parser.prog`."""
    prog = parser.prog
    function = "_" + prog.replace("-", "_")
    paths = list(_paths(parser))
    steps = [f"      {shlex.quote(f'{path}|{name}')}) path={shlex.quote(f'{path} {name}'.strip())} ;;"
             for path, sub in paths for name in _subcommands(sub)]  # fmt: skip
    words = [f"    {shlex.quote(path)}) words={shlex.quote(' '.join(_words(sub)))} ;;" for path, sub in paths]
    choices = [
        f"    {shlex.quote(f'{path}|{option}')}) words={shlex.quote(' '.join(values))} ;;"
        for path, sub in paths
        for option, values in _flag_choices(sub)
    ]
    return "\n".join(
        [
            f"# {prog} completion (bash; zsh after bashcompinit)",
            f"{function}() {{",
            '  local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" path="" words="" i',
            "  for ((i = 1; i < COMP_CWORD; i++)); do",
            '    case "$path|${COMP_WORDS[i]}" in',
            *steps,
            "    esac",
            "  done",
            '  case "$path" in',
            *words,
            "  esac",
            '  case "$path|$prev" in',
            *choices,
            "  esac",
            '  COMPREPLY=($(compgen -W "$words" -- "$cur"))',
            "}",
            f"complete -F {function} {prog}",
            "",
        ]
    )
