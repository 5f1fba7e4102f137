"""The commands (`python -m distributed_tune COMMAND`): each module has `parser()` and `run(argv)`
and only wires the library together; nothing in the library imports a command."""
