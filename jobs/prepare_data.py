"""Prepare a corpus as a Ray job: read, clean, tokenize and pack into parquet shards.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/prepare_data.py --config run.yaml --data 's3://bucket/corpus/**/*.parquet' \
        --tokenizer s3://bucket/tokenizers/v1 --out s3://bucket/prepared/v1 data.seq_len=2048

Arguments are those of `raylm data prepare --help`.
`run.yaml` is any raylm config file in the working directory (see README.md,
Configuration); `--config` may be left out, and dotted overrides apply on top of it.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
