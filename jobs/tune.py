"""Hyperparameter search on a Ray cluster: `raylm tune` as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py --space space.yaml --config proxy.yaml --data 's3://bucket/corpus/*.jsonl.gz' \
        name=lr-search storage=s3://bucket/runs train.num_workers=2 train.use_gpu=true \
        tune.num_samples=16 tune.max_concurrent_trials=4

The job's driver joins the cluster through RAY_ADDRESS (set by `ray job submit`) and runs
the search; each trial is a Ray Train run of train.num_workers workers. `space.yaml` and
`proxy.yaml` are files in the working directory (see README.md, Tuning). If the driver dies,
continue the search, keeping its finished trials:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py --resume name=lr-search storage=s3://bucket/runs

The best trial's config is then `s3://bucket/runs/lr-search/best.yaml`, ready for
`jobs/pretrain.py --config`. Arguments are those of `raylm tune --help`.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
