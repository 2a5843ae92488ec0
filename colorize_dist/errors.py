"""The one base of the errors a user can fix (bad input, a missing file, a full disk, a refused job).

The library raises them with a message meant for the user as is; the command line (`cli.run`) turns one into a
single line `COMMAND: message` on stderr and the exit status the error carries, in one place. Anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message tells the user what to change; `exit_status` is the command's status (2: usage)."""

    exit_status = 2

    def __init__(self, message: str = "", *, exit_status: int | None = None):
        super().__init__(message)
        if exit_status is not None:
            self.exit_status = exit_status
