"""Deploy the OpenAI-compatible server on a cluster as a Ray job, then return.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py s3://bucket/runs/quickstart-sft --host 0.0.0.0 --port 8000

Serve applications outlive the job that deployed them (Serve's controller is detached), so the
job exits once the app answers readiness; `serve shutdown` (or `serve.delete("raylm")`)
stops it, gracefully. Arguments are those of `raylm serve` (`--engine vllm` for an HF export
on GPU nodes; `KEY=VALUE` ServeConfig fields such as `autoscale_max_replicas=4`). Anything
but loopback needs the API key, which the job's driver reads from RAYLM_API_KEY in the
environment of the head, where it runs: a Kubernetes Secret (cluster/kuberay/raycluster.yaml's
head takes it from the Secret raylm-serve), or the environment `ray start --head` ran in. Never
through the job's runtime_env (`--runtime-env-json '{"env_vars": ...}'`): Ray shows a job's
runtime_env in the Jobs API and writes it, env_vars and all, into runtime_env_agent.log on
every node the job uses. A head without the key serves on loopback only (`--host 127.0.0.1`),
reached through an SSH tunnel (`ray attach cluster/aws-gpu.yaml -p 8000`).
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
