"""Config keys with their rules on the key: `key(default, resume=..., check=..., trainer=...)`.

A leaf module (imports nothing of the package): `config.py` declares the package's
sections with it, and a task declares its own section (`tasks/custom.py`) without importing the
config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# Every leaf key is declared with `key(default, resume=..., ...)`: its rules live on the field.
#   resume   "fixed": part of what is trained (data, model, recipe, arithmetic); a resume that
#            changes it is refused. "grow": the run's length (train.epochs, train.max_steps); a
#            resume may make the run longer, never shorter: the extension is recorded, and the
#            learning rate follows the longer run's schedule from the resumed step on (as the HF
#            Trainer does). "free": how the run is watched, stored or laid out (logging,
#            evaluation and checkpoint frequency, paths, micro batch / accumulation, offload);
#            a resume may change it and trains the same steps.
#   check    a bound on the value alone (floats must also be finite); combinations of keys are
#            checked in `validate`.
#   trainer  the names users bring from the HF Trainer / run_glue.py, for the unknown-key error:
#            a name, or {name: what to say}.
#   accelerate  the accelerate setting (`accelerate launch` flag / config file) that supplies the
#            value when our config leaves it unset (distributed.accelerate_settings reads them).
#   formerly the key's name in an earlier release: a file or override that uses it is read as
#            this key (a run directory's config.yaml written before the rename stays loadable).

Resume = Literal["fixed", "grow", "free"]


@dataclass(frozen=True)
class Check:
    """A bound on one value: `ok(value)`, else the error reads f"{key}={value} {says}"."""

    ok: Callable[[Any], bool]
    says: str


AT_LEAST_1 = Check(lambda v: v >= 1, "must be at least 1")
OFF_OR_POSITIVE = Check(lambda v: v >= 0, "must be 0 (off) or positive")


def key(default: Any, *, resume: Resume, check: Check | None = None, trainer: str | dict[str, str] | None = None,
        accelerate: str | None = None, formerly: str | None = None) -> Any:
    """A config key with its rules (see above) in the dataclass field's metadata."""
    return field(default=default, metadata={"resume": resume, "check": check, "trainer": trainer,
                                            "accelerate": accelerate, "formerly": formerly})
