"""The progress line of a running grid: runs done, running, left (known so far), ETA."""

import sys
import time


class GridProgress:
    def __init__(self, stream=None, min_interval_s: float = 2.0):
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval_s = min_interval_s
        self._last = ""
        self._last_time = 0.0

    def update(self, done: int, running: int, left: int, seconds_per_run: float | None, parallel: int,
               final: bool = False) -> str:
        """left counts the runs the phases need now; later coordinate-descent passes may add more, hence the '+'."""
        eta = "?" if seconds_per_run is None else _duration(left * seconds_per_run / max(1, parallel))
        line = f"grid: {done} done | {running} running | {left}{'' if final else '+'} left | ETA {eta}"
        now = time.time()
        if line != self._last and (final or now - self._last_time >= self.min_interval_s):
            self.stream.write(("\r" + line.ljust(len(self._last)) if self.interactive else line + "\n"))
            if final and self.interactive:
                self.stream.write("\n")
            self.stream.flush()
            self._last, self._last_time = line, now
        return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
