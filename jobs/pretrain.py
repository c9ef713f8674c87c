"""Pre-train on a Ray cluster: `raylm pretrain` as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pretrain.py --config run.yaml --data 's3://bucket/corpus/*.jsonl.gz' \
        name=run1 storage=s3://bucket/runs train.num_workers=8 train.use_gpu=true model.preset=1b \
        tokenizer.vocab_size=32000 data.seq_len=2048 train.micro_batch_size=2 train.global_batch_size=256

The job's driver joins the cluster through RAY_ADDRESS (set by `ray job submit`); the
working directory travels to every worker, so `raylm` needs no separate install there.
Arguments are those of `raylm pretrain --help`. Resubmitting the same command resumes
from the newest complete checkpoint of that run.
`run.yaml` is any raylm config file in the working directory (see README.md,
Configuration); `--config` may be left out, and dotted overrides apply on top of it.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
