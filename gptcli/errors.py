"""The one exception type the CLI turns into a clean one-line error."""


class GptcliError(Exception):
    """A problem the user can fix; the message is one line naming what and what to do.

    `exit_code` follows the CLI's convention: 1 for runtime problems (bad weights, files),
    2 for usage problems (bad option values).
    """

    exit_code = 1


class UsageError(GptcliError):
    exit_code = 2


class GptcliWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. NaN weights); the CLI
    shows it as one `warning:` line on stderr."""
