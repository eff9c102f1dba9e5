"""Teacher-forced log-probs from fresh engines, one checkpoint after another, in this (separate) process.

Launched by ``tests/weights/test_families.py``: ``python fresh_worker.py JOBS.json OUT.jsonl``. JOBS is a list of
``{"key": ..., "path": ..., "sequences": [[ids...], ...]}``; each finished job appends one JSON line
``{"key", "scores"}`` (or ``{"key", "error"}``) to OUT, so the caller can read results as they come.
"""

from __future__ import annotations


def main() -> None:
    import json
    import os
    import sys
    import traceback

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rollout_sleep.engine.engine import Engine

    jobs = json.loads(open(sys.argv[1]).read())
    with open(sys.argv[2], "a") as out:
        for job in jobs:
            try:
                eng = Engine(job["path"], dtype="float32", seed=0, max_model_len=256, kv_cache_bytes=32 << 20,
                             enforce_eager=True)
                try:
                    rec = {"key": job["key"], "scores": eng.score(job["sequences"])}
                finally:
                    eng.close()
            except Exception as e:  # recorded; the other jobs go on
                rec = {"key": job["key"], "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            out.write(json.dumps(rec) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
