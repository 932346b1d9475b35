"""The one base class for errors a user can cause and fix (bad params, missing or mismatched
files). Entry points print their message as one line, without a traceback."""


class UserError(ValueError):
    """A problem with the user's input; the message names the thing and what to do."""
