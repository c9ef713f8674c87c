"""Deploy the OpenAI-compatible server on a cluster as a Ray job, then return.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAYLM_API_KEY": "'"$RAYLM_API_KEY"'"}}' \
        -- python jobs/serve.py s3://bucket/runs/quickstart-sft --host 0.0.0.0 --port 8000

Serve applications outlive the job that deployed them (Serve's controller is detached), so the
job exits once the app answers readiness; `serve shutdown` (or `serve.delete("raylm")`)
stops it, gracefully. Arguments are those of `raylm serve` (`--engine vllm` for an HF export
on GPU nodes; `KEY=VALUE` ServeConfig fields such as `autoscale_max_replicas=4`). Anything
but loopback needs the API key: pass it through the job's environment as above (those who can
read the job's runtime env on the dashboard can read it; the dashboard sits behind Ray's token
auth).
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
