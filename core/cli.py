"""The edge between a script and its user: libraries raise ordinary exceptions with a clear
message; the script's entry point turns them into one `error: ...` line and exit code 2.

    if __name__ == "__main__":
        cli.run(lambda: main(parse_args()))

Set MINISSL_TRACEBACK=1 to see the full traceback instead. Ctrl-C outside a training loop (whose
own handler finishes the step and saves, core/preempt.py) ends with one line and exit code 130.
A training loss gone nan/inf (FloatingPointError, core/preempt.py) is one line and exit code 1.

ArgumentParser prints argparse's own error line without the usage block before it;
HelpFormatter makes `--help` end every flag's help with its effective default.
"""
import argparse
import os
import re
import sys

# What a user can cause (a bad flag value, a missing or unreadable file): reported in one line.
# Anything else is a bug of ours and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def print_args(args):
    """Every flag as `name: value`, sorted (main_dino.py's listing). The scripts call it once the
    flags the data or the checkpoint decide are resolved, and change none after it: the listing
    is what their checkpoints store."""
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))


def error_message(exc):
    text = str(exc) if not isinstance(exc, KeyError) else exc.args[0]
    if "Original Traceback" in str(text):
        # raised in a DataLoader worker: torch re-raises it with the worker's whole traceback
        # as the message, whose last line is "<type>: <the message>"
        text = re.sub(r"^[\w.]+: ", "", str(text).strip().splitlines()[-1])
    text = " ".join(str(text).split())  # one line
    return text if text.startswith("error:") else f"error: {text}"


def run(main):
    """Call main(); a user error ends the process with one line on stderr and exit code 2, a
    non-finite training loss with one line and exit code 1 (as DINO), a Ctrl-C with one line
    and exit code 130 (what an interrupted command returns). A rank of a multi-process run
    then leaves without the interpreter's teardown (_leave_now)."""
    try:
        return _run(main)
    finally:
        from core import dist as distu
        if distu.one_of_several_ranks():
            _leave_now()


def _leave_now():
    """os._exit with the exit status the process was about to end with, its output flushed.
    Why: gloo's worker threads release the tensors of the last collectives a moment after the
    collective returns, and they need the GIL for it; when the interpreter is already tearing
    down, such a thread is ended inside a C++ destructor and the process aborts ("terminate
    called without an active exception", SIGABRT, seen in about half of the 2-process CPU runs
    once the last all-reduce came right before the exit). Everything the run writes (log.txt,
    checkpoints, TensorBoard) is closed by then; only the teardown is skipped."""
    exc = sys.exc_info()[1]
    if exc is None:
        code = 0
    elif isinstance(exc, SystemExit):
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    else:  # an unexpected error: its traceback, as the interpreter would print it
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _run(main):
    try:
        return main()
    except (*USER_ERRORS, FloatingPointError) as exc:
        if os.environ.get("MINISSL_TRACEBACK"):
            raise
        print(error_message(exc), file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(exc, FloatingPointError) else 2)
    except KeyboardInterrupt:
        if os.environ.get("MINISSL_TRACEBACK"):
            raise
        print("Stopped by Ctrl-C (outside the training loop: nothing more to save).",
              file=sys.stderr, flush=True)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's error line (`prog: error: argument --arch: invalid choice: ...`), exit code
    2, without the usage block argparse prints before it (27 lines for train_ssl.py), which
    hides the line that matters; --help still prints it, every flag with its default
    (HelpFormatter, unless another formatter_class is given)."""

    def __init__(self, *args, formatter_class=None, **kwargs):
        super().__init__(*args, formatter_class=formatter_class or HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def format_value(value):
    """A default as it would be typed: true/false, space-separated lists, short floats."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(format_value(v) for v in value)
    return str(value) if value != "" else '""'


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every flag's help, X being the parser's default at the time
    of --help, so defaults set by set_defaults (a method's recipe) show too. Flags listed in
    `recipe_flags` read "(default: X, the method's recipe)". A flag whose default is None says
    in its own help what unset means."""

    recipe_flags = ()

    def _get_help_string(self, action):
        help = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS \
                or "%(default)" in help or action.dest == "help":
            return help
        recipe = action.dest in self.recipe_flags
        if action.default is None:
            return help + " (default: the method's recipe)" if recipe else help
        value = format_value(action.default).replace("%", "%%")  # help strings are %-formatted
        suffix = ", the method's recipe" if recipe else ""
        return f"{help} (default: {value}{suffix})"
