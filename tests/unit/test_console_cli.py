"""The CLI around the console: every subcommand takes its config the same way (FILE, -c FILE,
--config FILE), the users file (0600, scrypt, roles, tokens), a file open to others refused."""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

import pytest

from flux_edge.cli import main
from flux_edge.console.auth import (
    Authority,
    ConsoleAuthError,
    LoginLimiter,
    read_users,
    verify_password,
)

DEMO = str(Path(__file__).resolve().parents[2] / "config" / "demo.toml")


@pytest.mark.parametrize("form", [[DEMO], ["-c", DEMO], ["--config", DEMO]])
def test_check_config_takes_the_config_every_way(form: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", *form]) == 0
    assert "ok (1 source(s)" in capsys.readouterr().out


def test_check_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_EDGE_CONFIG", DEMO)
    assert main(["check-config"]) == 0


def test_two_different_configs_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["check-config", DEMO, "-c", "/x.toml"])


def test_users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "users.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long enough password\n"))
    assert main(["console", "user", "add", "alice", "--role", "operator", "--password-stdin",
                 "--users-file", str(users)]) == 0
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    data = read_users(users)
    h = data["users"]["alice"]["hash"]
    assert h.startswith("scrypt$16384$8$1$") and "a long enough" not in users.read_text()
    assert verify_password("a long enough password", h)
    assert not verify_password("a long enough passwore", h)
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["console", "user", "add", "bob", "--role", "viewer", "--password-stdin",
                 "--users-file", str(users)]) == 1  # too short: no default, no weak password
    auth = Authority(users, session_timeout=60, idle_timeout=60, attempts=3, window=60)
    assert auth.check_password("alice", "a long enough password") == "operator"
    assert auth.check_password("nobody", "a long enough password") is None
    os.chmod(users, 0o644)
    with pytest.raises(ConsoleAuthError, match="chmod 600"):
        read_users(users)


def test_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users.json"
    assert main(["console", "token", "add", "grafana", "--role", "viewer",
                 "--users-file", str(users)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("fxe_") and token not in users.read_text()
    auth = Authority(users, session_timeout=60, idle_timeout=60, attempts=3, window=60)
    who = auth.check_token(token)
    assert who is not None and who.role == "viewer" and who.name == "grafana"
    assert main(["console", "token", "remove", "grafana", "--users-file", str(users)]) == 0
    assert auth.check_token(token) is None


def test_login_limiter() -> None:
    now = [0.0]
    lim = LoginLimiter(3, 60.0, lambda: now[0])
    for _ in range(3):
        assert lim.retry_after("ip:a") == 0
        lim.failed("ip:a")
    assert lim.retry_after("ip:a") == 60.0
    assert lim.retry_after("ip:b") == 0
    now[0] = 61.0
    assert lim.retry_after("ip:a") == 0


def test_sessions_expire_and_follow_the_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    from flux_edge.console.auth import add_user, remove_user

    add_user(users, "alice", "operator", "a long enough password")
    now = [0.0]
    auth = Authority(users, session_timeout=100, idle_timeout=50, attempts=3, window=60,
                     clock=lambda: now[0])
    s = auth.new_session("alice", "operator")
    now[0] = 40
    assert auth.session(s.id) is s
    now[0] = 95
    assert auth.session(s.id) is None  # idle for 55 s
    s = auth.new_session("alice", "operator")
    remove_user(users, "alice")
    os.utime(users, ns=(1, 1))
    assert auth.session(s.id) is None  # removed: the session ends at once


@pytest.mark.parametrize("form", [[DEMO], ["-c", DEMO], ["--config", DEMO]])
def test_rules_test_takes_the_config_every_way(form: list[str]) -> None:
    assert main(["rules", "test", *form]) == 0


def test_audit_tail_takes_the_config_every_way(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"ts": "2026-12-07T00:00:00Z", "rule": "r", "action": "a"}\n')
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    for form in ([str(cfg)], ["-c", str(cfg)], ["--file", str(audit)]):
        assert main(["audit", "tail", "--json", *form]) == 0
        assert '"rule": "r"' in capsys.readouterr().out.replace('":"', '": "')
