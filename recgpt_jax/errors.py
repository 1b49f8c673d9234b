"""User-facing errors: reported as one line on stderr with a non-zero exit, never a traceback."""

import sys


class UserError(Exception):
  """A problem with the user's input (data, config, flags). ``exit_code`` is the process exit code."""

  exit_code = 2


class DataError(UserError, ValueError):
  """Malformed or unusable input data. The message names the file, line and problem where known."""


class ConfigError(UserError, ValueError):
  """An invalid configuration value or combination of values."""


class RequestError(UserError, ValueError):
  """An invalid serving request: an unknown or malformed user or item id, a bad export destination."""


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl ``flags_parser`` of the command-line programs: any bad flag, config file or config field is one line on
  stderr and exit code 2 (``app.run(main, flags_parser=parse_flags_or_exit)``)."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError) as e:
    # ml_collections raises these for an unknown --config.<field> or an unloadable config file.
    detail = " ".join(str(e).split())
    if len(detail) >= 2 and detail[0] == detail[-1] and detail[0] in "'\"":  # a KeyError's quoted message
      detail = detail[1:-1]
    message = f"bad --config: {detail}"
  except Exception as e:  # noqa: BLE001 (the config file is executed while the flags are parsed: anything it raises)
    detail = " ".join(str(e).split())
    message = f"cannot load --config: {type(e).__name__}{': ' + detail if detail else ''}"
  print(f"error: {message.splitlines()[0] if message else 'bad flags'} (see --helpshort)", file=sys.stderr)
  sys.exit(2)
