"""Supervised fine-tuning on a Ray cluster: `raylm sft` as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/sft.py --config run.yaml --from s3://bucket/runs/base --data 's3://bucket/chat/*.jsonl' \
        storage=s3://bucket/runs train.num_workers=8 train.use_gpu=true train.micro_batch_size=4

Arguments are those of `raylm sft --help`. The run is named <parent>-sft unless name= says
otherwise; resubmitting the same command resumes from its newest complete checkpoint.
`run.yaml` is any raylm config file in the working directory (see README.md,
Configuration); `--config` may be left out, and dotted overrides apply on top of it.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
