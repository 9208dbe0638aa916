"""The Standard Webhooks signature (standardwebhooks.com), as OpenAI's webhooks carry it.

`webhook-signature` is `v1,` and the base64 HMAC-SHA256, keyed with the
secret's base64 part, of `{webhook-id}.{webhook-timestamp}.{body}`. The
openai SDK's `webhooks.verify_signature` and `webhooks.unwrap` check exactly
this, and refuse a timestamp more than five minutes off: each attempt is
signed anew with its own time, under the same `webhook-id`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt to deliver `body` as message `msg_id`."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
        "Content-Type": "application/json",
    }
