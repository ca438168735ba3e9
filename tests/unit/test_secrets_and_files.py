"""Secrets kept out of the TOML, exposure warnings, state files (issue #13, item 8).

Secrets: a password as text, from { file = ... } or from a systemd credential
($CREDENTIALS_DIRECTORY), a TLS key from a credential; a secret of the wrong type is described,
never shown. Warnings: verify_hostname = false, a password to a remote broker without TLS, a
world-readable file holding secrets, metrics beyond loopback. State files: 0640 / 0750 whatever
the umask, never opened through a symbolic link (audit log, outbox, rule state)."""

from __future__ import annotations

import io
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from flux_edge import cli
from flux_edge.actions.audit import AuditLog
from flux_edge.errors import FluxError, PluginLoadError
from flux_edge.files import ensure_dir, open_state_file, prepare_sqlite
from flux_edge.kinds import check_config
from flux_edge.rules.state import RuleStore
from tests.unit.test_audit import command

BASE = '[daemon]\nstate_dir = "/tmp/flux-edge-test-state"\n'


def write(tmp_path: Path, text: str, mode: int = 0o640) -> Path:
    path = tmp_path / "flux-edge.toml"
    path.write_text(BASE + text)
    path.chmod(mode)
    return path


def problems(path: Path) -> list[str]:
    _, found = check_config(path)
    return [str(p) for p in found]


def test_a_secret_of_the_wrong_type_is_never_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, '[uplink]\nhost = "broker"\npassword = 987654321\n')
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        rc = cli.main(["check-config", str(path)])
    assert rc == 78
    text = err.getvalue()
    assert "uplink.password" in text and "got an integer" in text and ":5:" in text
    assert "987654321" not in text
    for value in ("[1, 2]", "{ x = 'hunter2' }", "2026-01-01", "true"):
        path = write(tmp_path, f'[uplink]\nhost = "broker"\npassword = {value}\n')
        assert "hunter2" not in "\n".join(problems(path))
        assert any("uplink.password" in p for p in problems(path))


def test_a_password_from_a_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "uplink.pass").write_text("hunter2\n")
    (tmp_path / "uplink.pass").chmod(0o600)
    path = write(tmp_path, '[uplink]\nhost = "localhost"\npassword = { file = "uplink.pass" }\n')
    config, found = check_config(path)
    assert config is not None and config.uplink is not None, found
    assert config.uplink.password == "hunter2"  # one trailing newline off
    assert found == []
    (tmp_path / "uplink.pass").chmod(0o644)
    (warning,) = check_config(path)[1]
    assert warning.severity == "warning" and "every user" in warning.message
    assert "hunter2" not in warning.message
    path = write(tmp_path, '[uplink]\nhost = "localhost"\npassword = { file = "nope.pass" }\n')
    (msg,) = problems(path)
    assert "cannot read the secret file" in msg and "No such file" in msg


@contextmanager
def credentials(tmp_path: Path, **files: str) -> Iterator[Path]:
    d = tmp_path / "credentials"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", "-")).write_text(text)
    old = os.environ.get("CREDENTIALS_DIRECTORY")
    os.environ["CREDENTIALS_DIRECTORY"] = str(d)
    try:
        yield d
    finally:
        if old is None:
            del os.environ["CREDENTIALS_DIRECTORY"]
        else:
            os.environ["CREDENTIALS_DIRECTORY"] = old


def test_systemd_credentials_for_passwords_and_tls_keys(tmp_path: Path) -> None:
    text = (
        '[uplink]\nhost = "broker.example"\npassword = { credential = "uplink-password" }\n'
        'tls = { cert_file = { credential = "uplink-cert" }, key_file = { credential = '
        '"uplink-key" } }\n'
        '[sources.feed]\ntype = "mqtt"\nhost = "localhost"\npassword = { credential = "feed" }\n'
        'topics = [{ topic = "a/b" }]\n'
    )
    path = write(tmp_path, text)
    found = problems(path)
    assert any("CREDENTIALS_DIRECTORY is not set" in p for p in found), found
    with credentials(tmp_path, uplink_password="s3cret\n", uplink_cert="C", uplink_key="K",
                     feed="f33d") as d:
        config, found2 = check_config(path)
        assert config is not None, found2
        assert config.uplink is not None and config.uplink.password == "s3cret"
        assert config.uplink.tls is not None
        assert config.uplink.tls.key_file == str(d / "uplink-key")
        assert config.uplink.tls.cert_file == str(d / "uplink-cert")
        assert config.sources["feed"].password == "f33d"  # type: ignore[attr-defined]
        (d / "feed").unlink()
        assert any("no file" in p and "feed" in p for p in problems(path))


def test_warnings_about_exposure(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[metrics]\nhost = "0.0.0.0"\n[uplink]\nhost = "broker.example"\npassword = "pw"\n'
        "[uplink.tls]\nverify_hostname = false\n",
        mode=0o644,
    )
    config, found = check_config(path)
    assert config is not None  # warnings only
    text = "\n".join(f"{p.path}: {p.severity}: {p.message}" for p in found)
    assert "uplink.tls.verify_hostname: warning" in text
    assert "metrics.host: warning" in text
    assert "every user of this machine can read it (mode 0644)" in text
    assert "without TLS" not in text  # it has TLS
    path = write(tmp_path, '[uplink]\nhost = "broker.example"\npassword = "pw"\n')
    found = [p for p in check_config(path)[1] if p.severity == "warning"]
    assert [p.path for p in found] == ["uplink.password"]  # 0640: only the clear-text one
    assert "clear text" in found[0].message and "pw" not in found[0].message.split(":")[0]
    path = write(tmp_path, '[uplink]\nhost = "127.0.0.1"\npassword = "pw"\n[metrics]\n'
                 'host = "::1"\n')
    assert [p for p in check_config(path)[1] if p.severity == "warning"] == []


# --- state files ------------------------------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_state_files_and_dirs_get_their_modes_whatever_the_umask(
    tmp_path: Path, mask: int
) -> None:
    with umask(mask):
        d = ensure_dir(tmp_path / "state" / "deep")
        fd = open_state_file(d / "f", os.O_WRONLY | os.O_CREAT)
        os.close(fd)
        audit = AuditLog(d / "audit.jsonl", max_size=1 << 20, keep=1)
        audit.record(command(), allowed=True)
        audit.close()
        store = RuleStore.in_state_dir(d)
        store.close()
        db = prepare_sqlite(d / "x.sqlite")
        sqlite3.connect(db).execute("create table t (x)").connection.close()
    for p in (tmp_path / "state", d):
        assert stat.S_IMODE(p.stat().st_mode) == 0o750, (p, oct(p.stat().st_mode))
    for p in (d / "f", d / "rules.sqlite", d / "x.sqlite", d / "audit.jsonl"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, (p, oct(p.stat().st_mode))


def test_an_audit_log_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "audit.jsonl").symlink_to(target)
    with pytest.raises(FluxError, match="symbolic link"):
        open_state_file(tmp_path / "audit.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    audit = AuditLog(tmp_path / "audit.jsonl", max_size=1 << 20, keep=1)
    audit.record(command(), allowed=True)  # counted as lost, logged: not appended to the target
    audit.close()
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("link", ["rules.sqlite", "rules.sqlite-wal", "rules.sqlite-shm"])
def test_a_sqlite_store_behind_a_symlink_is_not_created_at_its_target(
    tmp_path: Path, link: str
) -> None:
    target = tmp_path / "target"
    (tmp_path / link).symlink_to(target)
    with pytest.raises(FluxError, match="symbolic link"):
        prepare_sqlite(tmp_path / "rules.sqlite")
    assert not target.exists()


def test_the_rule_store_and_the_outbox_refuse_a_symlinked_file(tmp_path: Path) -> None:
    from flux_edge.uplink.outbox import Outbox

    target = tmp_path / "target.sqlite"
    (tmp_path / "rules.sqlite").symlink_to(target)
    try:
        store = RuleStore.in_state_dir(tmp_path)
        store.close()
    except FluxError:
        pass
    assert not target.exists(), "the rule store was created at the link's target"
    (tmp_path / "outbox.sqlite").symlink_to(tmp_path / "target2.sqlite")
    with pytest.raises(FluxError, match="symbolic link"):
        box = Outbox(tmp_path / "outbox.sqlite", max_size=1 << 20, gateway="gw", topic="t/{name}")
        box.close()
    assert not (tmp_path / "target2.sqlite").exists()


# --- exit codes -------------------------------------------------------------------------------


def test_transient_failures_are_told_from_permanent_ones() -> None:
    assert cli.transient(MemoryError())
    assert cli.transient(OSError(12, "Cannot allocate memory"))
    assert cli.transient(OSError(28, "No space left on device"))
    enomem = PluginLoadError("p", "cannot instantiate: Cannot allocate memory (os error 12)")
    assert cli.transient(enomem)
    wrapped = PluginLoadError("p", "cannot load")
    wrapped.__cause__ = MemoryError()
    assert cli.transient(wrapped)
    assert not cli.transient(PluginLoadError("p", "missing export flux_process"))
    assert not cli.transient(OSError(2, "No such file or directory"))
