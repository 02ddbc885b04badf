"""The one exception type the command line turns into a one-line error message."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (flag, file, model path, data).

    ``python -m llm.train`` prints ``error: <message>`` on one line and exits with status 2;
    the message names the offending value.
    """
