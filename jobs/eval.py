"""Evaluation on a Ray cluster: `raylm eval` as a Ray job, its scoring on a pool of Ray actors.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"pip": ["lm-eval>=0.4.13"]}' -- \
        python jobs/eval.py --config run.yaml --tasks hellaswag,arc_easy --corpus 's3://bucket/val/*.jsonl.gz' \
        --workers 8 eval.gpus_per_worker=1 s3://bucket/runs/run1

Arguments are those of `raylm eval --help`: lm-eval tasks (--tasks: lm-eval, pyproject's eval
extra, which raylm's image leaves out, so the job installs it on each node as above),
built-in task files (--mc, --gen), corpora for bits per byte (--corpus), and dotted overrides
(eval.*, s3.*) on top of `--config` (any raylm config file in the working directory; it may be
left out). Results go to <run>/eval/<checkpoint>/results.{json,md} unless --out says otherwise.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
