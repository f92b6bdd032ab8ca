"""User-facing errors.

Anything a user can cause (a bad config value, missing data, an incompatible checkpoint) raises
`LmforgeError` with a message that names the problem and what is valid. The CLI prints such
errors as one line and exits with status 2; programming errors keep their tracebacks.
"""


class LmforgeError(Exception):
    """An error caused by user input; its message is shown to the user as is."""
