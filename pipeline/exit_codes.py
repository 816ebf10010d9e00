"""`relkd`'s exit codes and its usage error.

Kept apart from the runner, which imports TFX, Beam and TensorFlow (seconds), so that the command
answers `--help` and a mistyped flag before it loads any of them.
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DATA_REJECTED, EXIT_NOT_BLESSED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it: 128 + 2


class UsageError(ValueError):
    """The command line or the inputs it names cannot be used; the message says why."""
