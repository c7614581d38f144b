"""`cowfs help [TOPIC]` and `cowfs help --man`: the same text as every command's --help,
plus topics that belong to no single command, and all of it as a man page (roff).

Nothing here is written twice: a command's text is click's own help for it, the mount
options come from cowfs.mount_options, the control-file commands from cowfs.protocol.  The
group is the one the help command was invoked from (click's root), so this module does
not import cowfs.cli.main, which registers it.
"""
from __future__ import annotations

import sys
import textwrap
from typing import Callable

import click

from cowfs import __version__
from cowfs.daemon import options as mount_options
from cowfs.cli.errors import EXIT_CODES, CliError
from cowfs.cli.maintenance import FSCK_CODES
from cowfs.commands import protocol


def _control_file() -> list[str]:
    width = max(len(c.usage) for c in protocol.COMMANDS.values()) + 2
    out = ["Inside a mount, MOUNT/.cowfs/ctl takes one command per line and answers with one",
           "JSON object ({\"ok\": true, ...} or {\"ok\": false, \"errno\": NAME, \"error\": TEXT});",
           "a failed command also fails the write with that errno. Commands:", ""]
    for c in protocol.COMMANDS.values():
        lines = textwrap.wrap(c.help, 76 - width)
        out.append(f"  {c.usage:<{width}}{lines[0]}")
        out += [" " * (width + 2) + ln for ln in lines[1:]]
    out += ["", "Words are split as a POSIX shell splits them ('...', \"...\", backslash), and",
            "$'...' carries any byte: \\n \\t \\r \\\\ \\' \\xHH \\OOO. Example:", "",
            "  exec 3<>.cowfs/ctl; echo 'snapshot before-tests' >&3; cat <&3; exec 3>&-",
            "", "Only the owner of the mount root, root, and members of -o ctl_group= may open it;",
            ".cowfs/stats (read-only) is for anyone who may use the mount."]
    return out


def _exit_codes() -> list[str]:
    out = [ln for ln in EXIT_CODES.splitlines() if ln != "\b"]
    out += ["", "cowfs fsck (as fsck(8)):"] + [f"  {c}  {t}" for c, t in FSCK_CODES]
    out += ["", "cowfs run: its command's exit status (128+N if a signal N ended it; 126 or 127",
            "if it could not be run); 1 if the branch could not be mounted."]
    return out


def _completion() -> list[str]:
    return ["Shell completion of commands, options, mount points and snapshot names:", "",
            "  bash:  eval \"$(_COWFS_COMPLETE=bash_source cowfs)\"    (in ~/.bashrc)",
            "  zsh:   eval \"$(_COWFS_COMPLETE=zsh_source cowfs)\"     (in ~/.zshrc)",
            "  fish:  _COWFS_COMPLETE=fish_source cowfs | source       (in ~/.config/fish/completions/cowfs.fish)"]


TOPICS: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "mount-options": ("every -o option of cowfs mount and mount.fuse.cowfs",
                      lambda: ["Mount options (-o NAME or -o NAME=VALUE, repeatable or comma-separated):"]
                      + mount_options.help_lines()),
    "control-file": ("the .cowfs/ctl protocol inside a mount", _control_file),
    "exit-codes": ("what each exit status means", _exit_codes),
    "completion": ("shell completion", _completion),
}


def _group() -> click.Group:
    """The `cowfs` group this command runs under."""
    group = click.get_current_context().find_root().command
    assert isinstance(group, click.Group)
    return group


def commands(main: click.Group) -> dict[str, click.Command]:
    """Every command of the group, by name (the group loads its commands lazily)."""
    with click.Context(main, info_name="cowfs", **main.context_settings) as ctx:
        found = {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}
    return {name: cmd for name, cmd in found.items() if cmd is not None}


def command_help(main: click.Group, name: str) -> str:
    """Exactly what `cowfs NAME --help` prints."""
    cmd = commands(main)[name]
    with click.Context(main, info_name="cowfs", **main.context_settings) as parent:
        with click.Context(cmd, info_name=name, parent=parent, **cmd.context_settings) as ctx:
            return cmd.get_help(ctx)


def group_help(main: click.Group) -> str:
    with click.Context(main, info_name="cowfs", **main.context_settings) as ctx:
        return main.get_help(ctx)


def _roff(text: str) -> str:
    """Literal text for a no-fill roff block."""
    out = []
    for line in text.splitlines():
        line = line.replace("\\", "\\e")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def man_page(main: click.Group) -> str:
    """cowfs(1): the group's help, every command's help and every topic."""
    parts = [f'.TH COWFS 1 "" "cowfs {__version__}" "User Commands"',
             ".SH NAME", "cowfs \\- copy-on-write sandbox filesystems with snapshots, branches and O(1) clones",
             ".SH SYNOPSIS", ".B cowfs", "[\\-\\-debug] COMMAND [ARGS]...",
             ".SH DESCRIPTION", ".nf", _roff(group_help(main)), ".fi", ".SH COMMANDS"]
    for name in sorted(commands(main)):
        parts += [f".SS {name}", ".nf", _roff(command_help(main, name)), ".fi"]
    for topic, (summary, lines) in TOPICS.items():
        parts += [f".SH {topic.upper().replace('-', ' ')}", ".nf", _roff("\n".join(lines())), ".fi"]
    return "\n".join(parts) + "\n"


def _complete_topics(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    root = ctx.find_root().command
    names = root.list_commands(ctx) if isinstance(root, click.Group) else []
    return [t for t in sorted(names) + sorted(TOPICS) if t.startswith(incomplete)]


@click.command(name="help")
@click.argument("topic", required=False, shell_complete=_complete_topics)
@click.option("--man", is_flag=True, help="Print everything as a man page (cowfs help --man | man -l -).")
def help_(topic: str | None, man: bool) -> None:
    """Help on a command or a topic; without TOPIC, the commands and topics.

    Topics: mount-options, control-file, exit-codes, completion.
    """
    main = _group()
    if man:
        sys.stdout.write(man_page(main))
        return
    if topic is None:
        click.echo(group_help(main))
        click.echo("\nTopics (cowfs help TOPIC):")
        for name, (summary, _lines) in TOPICS.items():
            click.echo(f"  {name:<15}{summary}")
        return
    known = commands(main)
    if topic in known:
        click.echo(command_help(main, topic))
    elif topic in TOPICS:
        click.echo("\n".join(TOPICS[topic][1]()))
    else:
        raise CliError(f"no help topic {topic!r}; commands: {', '.join(sorted(known))}; "
                       f"topics: {', '.join(TOPICS)}", code=2)


COMMANDS = (help_,)
