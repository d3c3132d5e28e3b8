"""Presigned GET URLs from botocore, the reference our signer must match byte for byte.

Reads a JSON list of cases on stdin and prints a JSON list of URLs. Each case fixes the
signing time, so the Rust side can sign the same request at the same instant.
"""

import datetime
import json
import sys
from unittest import mock

import botocore.auth
import botocore.session
from botocore.config import Config


def presign(case):
    session = botocore.session.get_session()
    client = session.create_client(
        "s3",
        region_name=case["region"],
        endpoint_url=case["endpoint"],
        aws_access_key_id=case["access_key"],
        aws_secret_access_key=case["secret_key"],
        aws_session_token=case.get("token"),
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if case["path_style"] else "virtual"},
        ),
    )
    at = datetime.datetime.fromtimestamp(case["time"], datetime.timezone.utc)
    with mock.patch.object(
        botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: at.replace(tzinfo=None)
    ):
        return client.generate_presigned_url(
            "get_object",
            Params={"Bucket": case["bucket"], "Key": case["key"]},
            ExpiresIn=case["expires"],
        )


if __name__ == "__main__":
    print(json.dumps([presign(c) for c in json.load(sys.stdin)]))
