"""What rank 0 prints while training: a live bar in a terminal, plain periodic lines in a log file.

    out = Console(enabled=is_main, total_steps=801, done=0)
    out.say("eval step 50: ...")          # a line (above the bar in a terminal)
    out.step(50, loss=0.61, lr=2e-5, samples_per_s=210.0)
    out.close()

In a terminal (stderr is a TTY) a rich progress bar shows step, loss and throughput, and every
other line is printed above it. In a log file (every SLURM job) there is no bar: each logging
window writes one plain line `step 120/801 (15%) loss 0.5321 lr 1.9e-05 213 samples/s ETA 3m12s`.
Lines are never wrapped. The ETA counts everything since the start (evaluations included).
"""

from __future__ import annotations

import sys
import time
from typing import Any

PREFIX = "[distributed_tune]"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Console:
    def __init__(self, enabled: bool, total_steps: int, done: int = 0, stream: Any = None) -> None:
        self.enabled, self.total, self.first = enabled, total_steps, done
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.bar: Any = None
        if enabled and total_steps and self.stream.isatty():
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = RichConsole(file=self.stream, highlight=False, markup=False, soft_wrap=True)
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), console=console, transient=False)
            self.task = self.bar.add_task("train", total=total_steps, completed=done, info="")
            self.bar.start()

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{PREFIX} {message}"
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, file=self.stream, flush=True)

    def eta(self, step: int) -> float | None:
        done = step - self.first
        if done <= 0:
            return None
        return (time.monotonic() - self.start) / done * (self.total - step)

    def step(self, step: int, loss: float | None = None, lr: float | None = None,
             samples_per_s: float | None = None) -> None:
        """After optimizer step `step`; with numbers (a logging window), also a plain line off a TTY."""
        if not self.enabled:
            return
        eta = self.eta(step)
        info = []
        if loss is not None:
            info.append(f"loss {loss:.4f}")
        if lr is not None:
            info.append(f"lr {lr:.3g}")
        if samples_per_s is not None:
            info.append(f"{samples_per_s:.0f} samples/s")
        if eta is not None:
            info.append(f"ETA {duration(eta)}")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": "  ".join(info)} if loss is not None else {}))
        elif loss is not None:
            pct = 100.0 * step / self.total if self.total else 100.0
            print(f"{PREFIX} step {step}/{self.total} ({pct:.0f}%) " + " ".join(info), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start
