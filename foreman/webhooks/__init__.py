"""Signed webhooks when work ends: OpenAI's event shape, the Standard Webhooks signature, a durable outbox.

- `signing`: the `webhook-id`, `webhook-timestamp` and `webhook-signature` headers;
- `service`: `Webhooks`, the events a batch or a watched job makes, and the loop that delivers the
  outbox with retries.

The user's view is in docs/batches.md ("Webhooks").
"""
