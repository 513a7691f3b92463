"""Progress display: a tqdm bar on a terminal, one plain line per logged step otherwise."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

SHOWN = (("loss", "loss", "{:.4f}"), ("val_loss", "val", "{:.4f}"), ("grad_cos_sim/global", "cos", "{:.4f}"),
         ("bit_stall_rate", "stall", "{:.3f}"), ("overflow_rate", "ovf", "{:.2e}"))


class Progress:
    def __init__(self, config, start_step: int, tokens_per_step: int, enabled: bool = True):
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.interactive = enabled and sys.stdout.isatty()
        self._last = (start_step, time.perf_counter())
        self._bar = (tqdm(total=config.max_steps, initial=start_step, unit="step", dynamic_ncols=True)
                     if self.interactive else None)

    def _tokens_per_second(self, step: int) -> float:
        last_step, last_time = self._last
        now = time.perf_counter()
        self._last = (step, now)
        return (step - last_step) * self.tokens_per_step / max(now - last_time, 1e-9)

    def update(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        fields = {label: fmt.format(scalars[name]) for name, label, fmt in SHOWN if name in scalars}
        fields["tok/s"] = f"{self._tokens_per_second(step):.0f}"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(fields, refresh=True)
        else:
            print(f"step {step} " + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)

    def note(self, text: str) -> None:
        if self.enabled and text:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
