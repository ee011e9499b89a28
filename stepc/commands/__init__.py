"""One module per `stepc` subcommand that is more than a compiler pass (diff, verify, run, submit, sweep, eval,
report, corpus, data, generate, instructions)."""
