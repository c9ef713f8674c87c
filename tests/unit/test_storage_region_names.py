"""An S3 region that is no region name (`s3.region=us_east_1`, or the same in AWS_REGION) is
one line naming where it came from: botocore refused it at the first request with a traceback."""

import pytest

from raylm import storage
from raylm.config import S3Config
from raylm.errors import StorageError


@pytest.mark.parametrize("given, env, where", [
    ("us_east_1", {}, "s3.region=us_east_1"),
    ("", {"AWS_REGION": "eu west 1"}, "AWS_REGION=eu west 1"),
    ("", {"AWS_DEFAULT_REGION": "-eu-west-1"}, "AWS_DEFAULT_REGION=-eu-west-1"),
])
def test_a_region_that_is_no_region_name_is_one_line(monkeypatch, given, env, where):
    for k in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageError, match=rf"^{where}: not a region name \(like us-east-1\); fix it or leave it unset$"):
        storage.boto3_client(S3Config(region=given, endpoint_url="http://127.0.0.1:1"))


def test_region_names_and_the_default(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    assert storage._region(S3Config(region="eu-west-1")) == "eu-west-1"
    assert storage._region(S3Config()) == "ap-southeast-2"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert storage._region(None) == "us-east-1"
