"""The keys a --config file and the dotted overrides set come from the one reading of the file
(`config.load_config_given`): post-training's check of model.* keys against its parent read
the --config file a second time, so a config on S3 was fetched twice, and the check could
see other keys than the run's config was built from (the object changed in between)."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class _Forward(BaseHTTPRequestHandler):
    """Forwards each request as it came (headers, Host included, so S3 signatures still hold)."""

    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        proxy: CountingProxy = self.server.proxy
        with proxy.lock:
            proxy.requests.append((self.command, urlsplit(self.path).path))
        conn = http.client.HTTPConnection(*proxy.target, timeout=30)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() != "expect":  # answered here already (100 Continue)
                    conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        head = self.command == "HEAD"
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in ("transfer-encoding", "connection") or (k.lower() == "content-length" and not head):
                continue
            self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


class CountingProxy:
    """An HTTP proxy on loopback in front of `target` that records (method, path) of every request."""

    def __init__(self, target: str):
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Forward)
        self._server.daemon_threads = True
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "CountingProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_keys_of_the_file_and_the_overrides_are_given_and_the_bases_are_not(tmp_path):
    from raylm.config import load_config_given

    f = tmp_path / "c.yaml"
    f.write_text("name: r1\nmodel:\n  n_layers: 4\ntrain:\n  lr: 0.001\n")
    cfg, keys = load_config_given(str(f), ["model.dim=128", ("data.path", "x.txt"), "train={max_steps: 5}"],
                                  base={"stage": "sft", "init_from": "runs/p", "model": {"n_heads": 2}})
    assert keys == {"name", "model.n_layers", "train.lr", "model.dim", "data.path", "train.max_steps"}
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.train.max_steps) == (128, 4, 2, 5)
    assert load_config_given(None, [])[1] == frozenset()
    f.write_text("model:\n  preset: gpt2-124m\n")  # a preset sets the whole model: post-training reads it so
    assert load_config_given(str(f))[1] == {"model.preset"}


def test_a_config_on_s3_is_read_once_and_its_model_keys_reach_post_training(tiny_run, s3_server, s3_prefix,
                                                                             tmp_path, capsys):
    """`raylm sft --config s3://.../c.yaml` with model.dim: 128, the default, on a dim-64 parent:
    refused by name (the file set it), from one GET of the object (there were two)."""
    from raylm.cli import main

    bucket, key = s3_prefix.removeprefix("s3://").split("/", 1)
    key += "/c.yaml"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"model:\n  dim: 128\n")
    with CountingProxy(s3_server.endpoint) as proxy:
        rc = main(["sft", "--from", str(tiny_run), "--data", str(tmp_path / "chat.jsonl"), f"storage={tmp_path}",
                   "--config", f"s3://{bucket}/{key}", f"s3.endpoint_url={proxy.url}"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.dim=128: sft keeps the parent's model shape" in err, err
    assert proxy.requests.count(("GET", f"/{bucket}/{key}")) == 1, proxy.requests


def test_pretrain_init_from_hf_reads_an_s3_config_once(tiny_run, s3_server, s3_prefix, tmp_path, capsys):
    """`raylm pretrain --init-from-hf DIR --config s3://...` builds its config twice (once for
    the S3 settings that read DIR, once with DIR's model shape beneath the file): the file is
    fetched once (it was fetched twice, so the two could differ), and its keys still count."""
    from raylm.cli import main
    from raylm.export.hf import export_run

    hf_dir = export_run(str(tiny_run), str(tmp_path / "hf"))
    bucket, key = s3_prefix.removeprefix("s3://").split("/", 1)
    key += "/pretrain.yaml"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"model:\n  n_layers: 3\n")
    with CountingProxy(s3_server.endpoint) as proxy:
        rc = main(["pretrain", "--init-from-hf", hf_dir, f"tokenizer.path={tiny_run}/tokenizer", f"storage={tmp_path}",
                   "--config", f"s3://{bucket}/{key}", f"s3.endpoint_url={proxy.url}"])
    err = capsys.readouterr().err
    assert rc == 2 and "num_hidden_layers=2 but this run has model.n_layers=3" in err, err
    assert proxy.requests.count(("GET", f"/{bucket}/{key}")) == 1, proxy.requests
