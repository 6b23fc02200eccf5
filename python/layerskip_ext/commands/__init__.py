"""``layerskip`` sub-commands that live in their own modules: each has add_<name>_args(parser) and cmd_<name>(args).
cli.py only registers them."""
