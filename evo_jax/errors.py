"""Errors caused by the user's input. The command-line tools print their one-line message and
exit with status 2 instead of a traceback."""


class UserError(ValueError):
  """Bad input: a missing file, an empty corpus, a typo in a config key, a foreign workdir."""


class ConfigError(UserError):
  pass
