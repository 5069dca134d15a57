"""Progress that reads well both in a terminal (a tqdm bar) and in a log file (one line per update)."""
from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, log: Callable[[str], None] = print,
                 unit: str = "epoch") -> None:
        self.total, self.desc, self.log, self.unit = total, desc, log, unit
        self.enabled = enabled
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None

    def update(self, done: int, **values: float) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if v == v else f"{k}=-" for k, v in values.items())  # NaN: none yet
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(text, refresh=True)
        else:  # not a terminal: plain lines, no carriage returns
            self.log(f"[{self.desc}] {self.unit} {done}/{self.total} {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
