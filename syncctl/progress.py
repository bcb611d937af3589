"""The progress bar of ``syncctl sync`` on a terminal, drawn by tqdm."""

from __future__ import annotations

import shutil
from typing import Never, TextIO

from tqdm import tqdm

from broker import SyncProgress

__all__ = ["ProgressBar"]


class ProgressBar:
    """Draws a job's progress reports (batches published of the total) on ``stream``.

    The bar appears with the first report, so a job that sends none (a small one, or one
    rejected) leaves no trace; ``close`` draws it once more at its final state.

    Example::

        bar = ProgressBar(sys.stderr)
        try:
            await client.synchronize_to_device(..., on_progress=bar.show)
        finally:
            bar.close()
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        # Without an iterable: tqdm[Never].
        self._bar: tqdm[Never] | None = None

    def show(self, progress: SyncProgress) -> None:
        bar = self._bar
        if bar is None:
            # A terminal that reports no width (a pty of a headless session) gets 80
            # columns: tqdm would draw nothing at 0.
            width = shutil.get_terminal_size().columns or 80
            bar = self._bar = tqdm(
                total=progress.total,
                desc="sync",
                unit="batch",
                file=self._stream,
                leave=True,
                ncols=width,
            )
        bar.update(progress.published - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
