"""A small HTTP client for the console's API in tests (stdlib http.client; TLS not verified:
the console's certificate is self-signed)."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any


class ApiClient:
    def __init__(self, port: int, *, tls: bool, token: str = "") -> None:
        self.port = port
        self.tls = tls
        self.token = token
        self.cookie = ""
        self.csrf = ""

    def _conn(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx,
                                               timeout=timeout)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, csrf: bool = True,
                headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        h = {"Content-Type": "application/json", **(headers or {})}
        if self.cookie:
            h["Cookie"] = self.cookie
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if csrf and self.csrf and method == "POST":
            h["X-CSRF-Token"] = self.csrf
        conn = self._conn()
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            raw = resp.read()
            rh = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return resp.status, parsed, rh

    def get(self, path: str) -> tuple[int, Any]:
        status, data, _ = self.request("GET", "/api/v1/" + path)
        return status, data

    def post(self, path: str, body: Any = None, *, csrf: bool = True) -> tuple[int, Any]:
        status, data, _ = self.request("POST", "/api/v1/" + path, body or {}, csrf=csrf)
        return status, data

    def login(self, user: str, password: str) -> tuple[int, Any]:
        status, data, headers = self.request("POST", "/api/v1/login",
                                             {"user": user, "password": password})
        if status == 200:
            self.cookie = headers["set-cookie"].split(";", 1)[0]
            self.csrf = data["csrf"]
        return status, data

    def events(self, timeout: float = 10.0) -> Any:
        """An open SSE response (read lines from it)."""
        conn = self._conn(timeout)
        h = {"Cookie": self.cookie} if self.cookie else {"Authorization": f"Bearer {self.token}"}
        conn.request("GET", "/api/v1/events", headers=h)
        return conn.getresponse()
