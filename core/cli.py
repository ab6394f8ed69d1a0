"""The edge between a script and its user: libraries raise ordinary exceptions with a clear
message; the script's entry point turns them into one `error: ...` line and exit code 2.

    if __name__ == "__main__":
        cli.run(lambda: main(parse_args()))

Set MINISSL_TRACEBACK=1 to see the full traceback instead.
"""
import os
import sys

# What a user can cause (a bad flag value, a missing or unreadable file): reported in one line.
# Anything else is a bug of ours and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def error_message(exc):
    text = str(exc) if not isinstance(exc, KeyError) else exc.args[0]
    text = " ".join(str(text).split())  # one line
    return text if text.startswith("error:") else f"error: {text}"


def run(main):
    """Call main(); a user error ends the process with one line on stderr and exit code 2."""
    try:
        return main()
    except USER_ERRORS as exc:
        if os.environ.get("MINISSL_TRACEBACK"):
            raise
        print(error_message(exc), file=sys.stderr, flush=True)
        sys.exit(2)
