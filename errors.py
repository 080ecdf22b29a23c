"""The one exception type the project raises for bad user input; every script turns it into one line and a
non-zero exit. It lives alone so that any module can import it without importing the dataset code."""


class InputError(ValueError):
    """Bad user input; the message names the problem and the fix."""
