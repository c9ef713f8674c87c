"""Preference tuning (DPO) on a Ray cluster: `raylm dpo` as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/dpo.py --config run.yaml --from s3://bucket/runs/base-sft --data 's3://bucket/pairs/*.jsonl' \
        storage=s3://bucket/runs train.num_workers=8 train.use_gpu=true train.micro_batch_size=4 \
        dpo.beta=0.1 dpo.precompute_reference=true

Arguments are those of `raylm dpo --help`. The run is named <parent>-dpo unless name= says
otherwise; resubmitting the same command resumes from its newest complete checkpoint.
`run.yaml` is any raylm config file in the working directory (see README.md,
Configuration); `--config` may be left out, and dotted overrides apply on top of it.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
