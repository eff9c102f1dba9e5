"""W&B logging: offline by default, online when asked, a do-nothing tracker when disabled or not rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NullTracker:
    """Accepts every call and does nothing (wandb disabled, or not the main process)."""

    run_dir: Path | None = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def update_summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, *, project: str, config: dict, mode: str = "offline", name: str | None = None,
                 directory: str | Path = ".", resume_id: str | None = None):
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, config=config, mode=mode, name=name, dir=str(directory),
                              id=resume_id, resume="allow" if resume_id else None)
        self.run_dir = Path(self.run.dir).parent
        self.id = self.run.id

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. the memory plan), logged once with the next step's metrics."""
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, commit=False)

    def update_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(mode: str, *, main_process: bool = True, **kwargs) -> NullTracker | WandbTracker:
    """``mode``: offline / online / disabled. Only the main process logs."""
    if mode == "disabled" or not main_process:
        return NullTracker()
    return WandbTracker(mode=mode, **kwargs)
