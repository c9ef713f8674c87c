"""Run a whole recipe on a Ray cluster: `raylm run` as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run.py --config jobs/recipes/llama-1b-8gpu.yaml storage=s3://bucket/recipes \
        data.path='s3://bucket/corpus/*.jsonl.gz' stages.sft.data.path='s3://bucket/chat/*.jsonl' \
        stages.dpo.data.path='s3://bucket/preferences/*.jsonl'

The recipe names the stages (tokenizer, data, pretrain, sft, dpo, eval, export, serve); each
one done, with unchanged settings and its outputs still in storage, is skipped, so
resubmitting the same command continues where the last job stopped. The driver joins the
cluster through RAY_ADDRESS (set by `ray job submit`); the working directory travels to every
worker. Arguments are those of `raylm run --help`: the recipe (`--config FILE` or first
positional) and dotted overrides into it (`stages.pretrain.train.max_steps=100`); the
data paths above replace the recipe's <bucket> placeholders (the corpus, and the SFT and
DPO stages' records).
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
