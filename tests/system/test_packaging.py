"""Packages that ship whole: a wheel built from a fresh clone carries the bundled Wasm plugins
(the in-tree build backend builds them) or is not built at all; the Debian package of the daemon
(packaging/deb/build-deb.sh) installs into a booted Debian trixie system, where its unit starts
flux-edge READY with the plugins, the manual its Documentation= names is there, and removing the
package stops it and takes the venv away.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = REPO / ".venv" / "bin" / "python"


def _plugin_names() -> list[str]:
    line = re.search(r"^for dir in ([^;]+); do", (REPO / "plugins" / "build-all.sh").read_text(),
                     re.MULTILINE)
    assert line, "plugins/build-all.sh names no plugins"
    return [Path(d).name for d in line.group(1).split()]


def _clone(dest: Path) -> Path:
    # what a user gets: the committed tree, none of the build products git ignores
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)], check=True,
                   capture_output=True, timeout=120)
    assert not list((dest / "flux_edge" / "plugins").glob("bundled/*.wasm"))
    return dest


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CARGO_TARGET"))}
    return {**env, **extra}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_wheel_from_a_fresh_clone_carries_the_plugins(tmp_path: Path) -> None:
    clone = _clone(tmp_path / "clone")
    t0 = time.monotonic()
    res = subprocess.run([str(PY), "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"),
                          str(clone)], capture_output=True, text=True, timeout=800, env=_env(),
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("flux_edge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in _plugin_names():
        member = f"flux_edge/plugins/bundled/{name}.wasm"
        assert member in names, f"{member} not in {wheel.name}"
        assert zipfile.ZipFile(wheel).read(member)[:4] == b"\0asm"
    assert "flux_edge/plugins/templates/sdk/c/flux_plugin.h" in names
    # the web console's page and the alert rules are package data too (no CDN, nothing fetched)
    for rel in ("console/static/index.html", "console/static/app.js", "console/static/app.css",
                "console/alerts/flux-edge.rules.yml"):
        assert f"flux_edge/{rel}" in names, f"flux_edge/{rel} not in {wheel.name}"
    print(f"\nwheel from a fresh clone with its plugins built: {time.monotonic() - t0:.0f}s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_wheel_is_not_built_when_the_plugins_cannot_be(tmp_path: Path) -> None:
    clone = _clone(tmp_path / "clone")
    # an interpreter that cannot run the plugin tooling: build-all.sh fails, so must the wheel
    res = subprocess.run([str(PY), "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"),
                          str(clone)], capture_output=True, text=True, timeout=500,
                         env=_env(PYTHON="/bin/false"), check=False)
    assert res.returncode != 0, res.stdout[-2000:]
    assert "no package without its plugins" in res.stdout + res.stderr, res.stderr[-3000:]
    assert not list((tmp_path / "dist").glob("*.whl")) if (tmp_path / "dist").exists() else True


@pytest.mark.slow
@pytest.mark.system
@pytest.mark.timeout(1200)
def test_the_deb_installs_and_runs_the_daemon_under_systemd(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mmdebstrap and systemd-nspawn")
    from tests.support.nspawn import Container, build_rootfs, missing_tools

    missing = missing_tools() + [t for t in ("dpkg-deb",) if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"missing {missing}")
        pytest.skip(f"missing {missing}")
    t0 = time.monotonic()
    res = subprocess.run([str(REPO / "packaging" / "deb" / "build-deb.sh"), "amd64",
                          str(tmp_path / "deb"), "3.13"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    deb = Path(res.stdout.strip().splitlines()[-1])
    t_deb = time.monotonic() - t0
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True,
                          check=True).stdout
    assert "Depends: python3 (>= 3.13), python3 (<< 3.14), python3-venv" in info, info
    contents = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                              check=True).stdout
    assert "./usr/lib/systemd/system/flux-edge.service" in contents
    assert "./usr/share/doc/flux-edge/operations.md" in contents

    root = tmp_path / "root"
    t0 = time.monotonic()
    build_rootfs(root, ["python3", "python3-venv", "procps", "adduser"], suite="trixie")
    t_rootfs = time.monotonic() - t0
    shutil.copy(deb, root / "tmp" / deb.name)
    # installed as apt would, before the system first boots (postinst enables, cannot start)
    # (the test rootfs excludes /usr/share/doc from every package, as slim images do: the
    # package's manual is let back in, as on any ordinary system)
    res = subprocess.run(["chroot", str(root), "dpkg", "--path-include=/usr/share/doc/flux-edge/*",
                          "-i", f"/tmp/{deb.name}"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (root / "opt/flux-edge/venv/bin/flux-edge").is_file()
    assert (root / "etc/systemd/system/multi-user.target.wants/flux-edge.service").is_symlink()
    box = Container(root, name=f"flux-deb-{os.getpid()}", log=tmp_path / "console.log")
    try:
        box.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = box.show("flux-edge.service", "ActiveState", "SubState")
            if state["ActiveState"] in ("active", "failed"):
                break
            time.sleep(1)
        show = box.show("flux-edge.service", "ActiveState", "WatchdogUSec", "Documentation",
                        "FragmentPath", "User")
        assert show["ActiveState"] == "active", (show, box.run(
            "journalctl", "-u", "flux-edge", "--no-pager", "-n", "40", check=False).stdout)
        assert show["FragmentPath"] == "/usr/lib/systemd/system/flux-edge.service", show
        assert show["WatchdogUSec"] == "45s" and show["User"] == "flux-edge", show
        doc = show["Documentation"].split()[0]
        assert doc.startswith("file://"), show
        assert box.run("test", "-s", doc.removeprefix("file://"), check=False).returncode == 0, doc
        health = box.run("python3", "-c", "import urllib.request as u;"
                         "print(u.urlopen('http://127.0.0.1:9180/healthz').status)").stdout
        assert health.strip() == "200", health
        plugins = box.run("sh", "-c", "ls /opt/flux-edge/venv/lib/python3*/site-packages/"
                          "flux_edge/plugins/bundled/").stdout.split()
        assert {f"{n}.wasm" for n in _plugin_names()} <= set(plugins), plugins
        # removal stops the service and takes the venv; the configuration stays until purge
        res = box.run("dpkg", "-r", "flux-edge", check=False, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert box.show("flux-edge.service", "ActiveState")["ActiveState"] in ("inactive", "")
        assert box.run("test", "-e", "/opt/flux-edge/venv", check=False).returncode != 0
        assert box.run("test", "-f", "/etc/flux-edge/flux-edge.toml", check=False).returncode == 0
    finally:
        box.stop()
    print(f"\n.deb: built in {t_deb:.0f}s ({deb.stat().st_size / 2**20:.0f} MiB), trixie rootfs"
          f" {t_rootfs:.0f}s, installed and READY under systemd")
