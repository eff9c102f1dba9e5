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

    def finish(self, exit_code: int = 0) -> None:
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
        self._pending: dict[str, Any] = {}  # tables waiting for the next step's metrics

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log({**self._pending, **metrics}, step=step)
        self._pending.clear()

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. the memory plan), logged once with the next step's metrics (a ``commit=False`` log before
        the first step's ``log(step=...)`` was a row of its own at step 0)."""
        self._pending[key] = self._wandb.Table(columns=columns, data=rows)

    def update_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a run that failed (``exit_code`` != 0) is marked so and keeps what it logged."""
        self.run.finish(exit_code=exit_code)


def credentials_problem(mode: str) -> str | None:
    """Why W&B cannot log in ``mode``, or ``None``: wandb not installed (offline/online), or (online) no API key
    where wandb looks for one (``WANDB_API_KEY``, an identity token file, ~/.netrc, wandb's settings). Checked
    before the engine starts; reads only local files, never the network."""
    if mode == "disabled":
        return None
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return f"wandb.mode={mode} needs the wandb package, which is not installed: pip install wandb, or set " \
               "wandb.mode=disabled"
    if mode != "online":
        return None
    try:
        found = _wandb_credentials()
    except Exception as err:  # wandb found a key it calls malformed (e.g. a truncated WANDB_API_KEY)
        return (f"wandb.mode=online: wandb cannot use its credentials: {str(err).rstrip('.')}. Run `wandb login`, "
                "set WANDB_API_KEY to your API key, or set wandb.mode=offline (sync later with `wandb sync`)")
    if found:
        return None
    return ("wandb.mode=online but wandb has no API key here (none in WANDB_API_KEY, ~/.netrc or wandb's settings), "
            "so the run would fail at its first log, after the engine started. Run `wandb login`, set WANDB_API_KEY "
            "to your API key, or set wandb.mode=offline (sync later with `wandb sync`)")


def _wandb_credentials() -> bool:
    """Whether wandb finds an API key for its server (environment, .netrc, settings): its own lookup where this
    wandb has it, else the environment and .netrc."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import authenticate, host_url
    except ImportError:
        authenticate = None
    if authenticate is not None and hasattr(authenticate, "_use_system_auth"):
        settings = wandb_setup.singleton().settings
        return authenticate._use_system_auth(host=host_url.HostUrl(settings.base_url), source="rollout_sleep",
                                             update_session=False) is not None
    import netrc
    import os
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_tracker(mode: str, *, main_process: bool = True, **kwargs) -> NullTracker | WandbTracker:
    """``mode``: offline / online / disabled. Only the main process logs."""
    if mode == "disabled" or not main_process:
        return NullTracker()
    return WandbTracker(mode=mode, **kwargs)
