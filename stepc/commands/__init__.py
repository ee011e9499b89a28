"""One module per `stepc` subcommand that is more than a call into a pass."""
