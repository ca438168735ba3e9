"""The local web console and its JSON API under /api/v1, served by the daemon itself.

``app.Console`` (the routes), ``http`` (the small HTTP/1.1 server: keep-alive, TLS, SSE),
``auth`` (users file, scrypt, sessions, CSRF, login rate limits, tokens), ``views`` (what the
API reads from the running daemon), ``operate`` (operator actions through the safety layer and
the audit log), ``tls`` (the self-signed certificate). Off unless ``[console] enabled = true``;
docs/console.md. The package face imports nothing.
"""
