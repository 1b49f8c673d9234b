"""User-facing errors: reported as one line on stderr with a non-zero exit, never a traceback."""


class UserError(Exception):
  """A problem with the user's input (data, config, flags). ``exit_code`` is the process exit code."""

  exit_code = 2


class DataError(UserError, ValueError):
  """Malformed or unusable input data. The message names the file, line and problem where known."""


class ConfigError(UserError, ValueError):
  """An invalid configuration value or combination of values."""
