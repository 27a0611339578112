"""The `dflash` command: assembles the commands (dflash_cli/commands/, one module each) into one
app, and runs it. Errors the user can fix are one line on stderr and a non-zero exit (1 runtime,
2 usage, 130 Ctrl-C); tracebacks are for bugs."""
from __future__ import annotations

import errno
import os
import sys
import warnings

import click
import typer

from . import __version__
from .commands import bench, chat, completions, doctor, hub, run, serve, train
from .errors import DflashError, Interrupted

# Recent typer vendors its own click; older typer uses click itself. Catch both families.
_EXIT = (typer.Exit, click.exceptions.Exit)
_ABORT = (typer.Abort, click.exceptions.Abort)
_PARSER_ERRORS = (typer.TyperException, click.ClickException)
HELP_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="dflash",
    help="Lossless speculative decoding (DFlash) for local LLM chat: the same tokens, several times faster.\n\n"
         "Start with `dflash chat qwen3-8b`; `dflash models` lists what can run.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_NAMES},
)

for _command in (run.run, chat.chat, serve.serve, bench.bench, train.train, hub.pull, hub.models, hub.rm,
                 doctor.doctor, completions.completions):
    app.command(_command.__name__)(_command)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"dflash-cli {__version__}")
        raise typer.Exit()


def command() -> typer.core.TyperGroup:
    """The click command behind `app`, with help that shows no type placeholders (`<bool>`,
    `<str>`): flags and arguments show none, value options their metavar."""
    group = typer.main.get_command(app)
    for cmd in (group, *getattr(group, "commands", {}).values()):
        ctx = cmd.context_class(cmd, info_name=cmd.name, help_option_names=HELP_NAMES)
        for param in (*cmd.params, cmd.get_help_option(ctx)):
            if param is not None and (param.param_type_name == "argument" or getattr(param, "is_flag", False)):
                param.display_type_rich = lambda ctx: None
    return group


def main(argv: list[str] | None = None) -> int:
    """Entry point: the documented exit code (0 ok, 1 runtime error, 2 usage, 130 Ctrl-C; 0 when
    the reader of stdout leaves early), and never a traceback for a user's mistake.

    The command runs outside typer's own `main`, which would turn Ctrl-C into a *returned* 130,
    a closed pipe into exit 1, and hide both from this function."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cmd = command()
        with cmd.make_context("dflash", args) as ctx, warnings.catch_warnings():
            warnings.showwarning = _show_warning
            cmd.invoke(ctx)
        sys.stdout.flush()  # what is still buffered fails here, where a closed pipe is handled, not at exit
        return 0
    except _EXIT as e:
        return e.exit_code
    except SystemExit as e:
        if not _rich_saw_a_closed_pipe(e):
            raise
        return 0  # rich already pointed stdout at /dev/null
    except _ABORT:
        print("", file=sys.stderr)
        return 130
    except _PARSER_ERRORS as e:  # usage errors from the parser: exit 2, one line as every other error
        print(f"Error: {_parser_message(e)}", file=sys.stderr)
        return e.exit_code
    except DflashError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted:  # the partial answer and its statistics are out already
        return 130
    except KeyboardInterrupt:
        print("", file=sys.stderr)  # the shell's prompt must not land on the "^C" line
        return 130
    except BrokenPipeError:
        # `dflash run ... | head`: the reader left; say nothing, and keep Python's final flush quiet.
        _silence_stdout()
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # `dflash run ... > /dev/full`: stdout is the only file a command writes without its own check.
        _silence_stdout()
        print(f"Error: cannot write the output: {e.strerror}", file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line on stderr, as the notes are (Python's form adds the file, line and source)."""
    print(f"dflash: warning: {message}", file=sys.stderr)


def _parser_message(e: Exception) -> str:
    """The parser's message on one line, with where the usage is (click's own form is four lines:
    usage, a hint, a blank line, the error)."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)  # usage errors know their command; other parser errors do not
    return f"{message} (see `{ctx.command_path} -h`)" if ctx is not None else message


def _rich_saw_a_closed_pipe(e: SystemExit) -> bool:
    """Whether `e` is rich's answer to a closed stdout (`Console.on_broken_pipe` exits 1): the
    reader left early, which is exit 0 for every command, as for a BrokenPipeError of our own."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "on_broken_pipe"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still buffered
    does not fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
