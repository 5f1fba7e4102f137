"""Error types: bad input gets one line that names the file/line/key and the fix, exit code 2."""


class DistributedTuneError(Exception):
    """Bad input or an impossible setup; the CLI prints `error: <message>` and exits 2."""


class ConfigError(DistributedTuneError, ValueError):
    """An unknown key, a wrong type, or a combination of options that cannot run."""


class DataError(DistributedTuneError):
    """A missing, malformed or corrupted CoLA file or archive."""


class ModelError(DistributedTuneError):
    """A model or tokenizer that cannot be loaded."""


class RunDirError(DistributedTuneError):
    """A run directory that would be overwritten, or a checkpoint that cannot be resumed."""


class TrainingError(DistributedTuneError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""
