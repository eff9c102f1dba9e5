"""The server's flags: no bind beyond loopback through ``extra_args`` or a config file, guarded flags refused
however they are spelled."""

from __future__ import annotations

import pytest

from rollout_sleep.serve.args import check_extra_args
from rollout_sleep.serve.server import ServerProcess


@pytest.mark.parametrize("extra", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--api-key", "k"], ["--port", "80"]])
def test_extra_args_cannot_bypass_the_loopback_guard(ckpts, extra):
    with pytest.raises(ValueError, match="not allowed in extra_args"):
        ServerProcess(ckpts["untied0"], extra_args=extra)


def test_a_config_file_cannot_bypass_the_loopback_guard(ckpts, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("host: 0.0.0.0\nmax_num_seqs: 8\n")
    with pytest.raises(ValueError, match="sets host"):
        ServerProcess(ckpts["untied0"], extra_args=["--config", str(cfg)])
    cfg.write_text("max_num_seqs: 8\n")
    ServerProcess(ckpts["untied0"], extra_args=[f"--config={cfg}"])  # harmless settings pass


@pytest.mark.parametrize("args", [["--hos", "0.0.0.0"], ["--ho=0.0.0.0"], ["--api_key", "k"], ["--api-ke=k"],
                                  ["--por", "1"], ["--mode", "/x"]])
def test_abbreviated_or_underscored_guarded_flags_are_refused(args):
    """vLLM's parser turns ``_`` into ``-`` and argparse accepts unambiguous prefixes: both reached --host."""
    with pytest.raises(ValueError, match="not allowed in extra_args"):
        check_extra_args(args)


def test_an_abbreviated_config_flag_is_still_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("host: 0.0.0.0\n")
    with pytest.raises(ValueError, match="sets host"):
        check_extra_args(["--conf", str(cfg)])
    check_extra_args(["--max-num-seqs", "4", "--uvicorn-log-level", "warning"])  # ordinary flags pass
