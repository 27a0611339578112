"""The `dflash` commands, one module each: a typer function that parses its flags, calls the
library and prints. `cli.py` assembles them into the app; `options.py` holds the options they share
(and the groups that parse them into one value: `ModelOptions`, `SamplingParams`, `Reasoning`).

Every module imports only typer at the top: `dflash models` starts without torch."""
