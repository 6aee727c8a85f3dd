"""The one exception type for user mistakes.

Anything the user can fix (a bad file, a wrong option, no network for a download) raises
`UserError` with a single line that names the place and the fault. The CLI prints it as
`instructkit: error: <message>` and exits with status 2; it never shows a traceback for these.
"""


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""
