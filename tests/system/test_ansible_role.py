"""The Ansible role (ansible/roles/flux_edge) and its playbook.

Fast: the role's TOML filter (round trips through tomllib, with hypothesis), the redaction of
check-config output, the example inventory renders a configuration flux-edge accepts, ansible-lint
(profile production) and ansible-playbook --syntax-check.

Slow (root): the role applied for real by ansible-playbook to a Debian bookworm system booted with
systemd-nspawn (private network: the device installs from the wheelhouse with no network), then:
flux-edge.service active (Type=notify: READY received), watchdog armed, /healthz 200, a serial
source on a pty reading under the unit's DevicePolicy (enforced in the container), the local
mosquitto and the uplink with its password from ansible-vault, a second run that changes nothing,
a config change applied by reload (same process), a broken config that fails the play at
validation and leaves the service and its file alone, and a SIGSTOPped daemon restarted by
systemd's watchdog. Finally the role applied to a copy of the rootfs through a chroot with
flux_edge_manage_service false, as the image build does.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, bundled_wasm
from tests.support.daemon import metric

pytestmark = pytest.mark.system

ANSIBLE_DIR = ROOT / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "flux_edge"
EXAMPLE = ANSIBLE_DIR / "inventories" / "example"
BIN = Path(sys.executable).parent


def _filters() -> ModuleType:
    path = ROLE / "filter_plugins" / "flux_edge_toml.py"
    spec = importlib.util.spec_from_file_location("flux_edge_toml", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FILTERS = _filters()
to_toml: Callable[[object], str] = FILTERS.to_toml
redact: Callable[[str, list[str]], str] = FILTERS.redact


def need_tool(name: str) -> str:
    """A tool from the dev venv or PATH; a skip locally, a failure on CI."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        message = f"{name} not installed (tools/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


# --- the TOML filter --------------------------------------------------------------------------

keys = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=6))
def test_to_toml_round_trips_through_a_toml_parser(doc: dict[str, Any]) -> None:
    text = to_toml(doc)
    assert tomllib.loads(text) == doc, text


def test_to_toml_writes_flux_edge_shapes_as_a_person_would() -> None:
    text = to_toml({
        "daemon": {"name": "gw1", "plugin_dirs": ["plugins"]},
        "sources": {"boiler": {
            "type": "modbus_tcp", "tls": {}, "interval": "1s",
            "registers": [{"name": "t", "address": 100, "scale": 0.1}],
        }},
        "metrics": {"port": 9180},
    })
    assert text == (
        '[daemon]\nname = "gw1"\nplugin_dirs = ["plugins"]\n\n'
        '[sources.boiler]\ntype = "modbus_tcp"\ntls = {}\ninterval = "1s"\n\n'
        '[[sources.boiler.registers]]\nname = "t"\naddress = 100\nscale = 0.1\n\n'
        "[metrics]\nport = 9180\n"
    )
    assert to_toml({"x": math.inf, "y": -math.inf}) == "x = inf\ny = -inf\n"
    assert math.isnan(tomllib.loads(to_toml({"n": math.nan}))["n"])


def test_to_toml_refuses_what_toml_cannot_say_and_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"sources\.boiler\.port: has no value"):
        to_toml({"sources": {"boiler": {"port": None}}})
    with pytest.raises(ValueError, match=r"a\[1\]: cannot write a set"):
        to_toml({"a": [1, {2}]})
    with pytest.raises(ValueError, match="expects a mapping"):
        to_toml(["not", "a", "document"])


def test_redact_masks_secrets_and_messages_about_passwords() -> None:
    out = redact(
        "f.toml:3:12: uplink.password: error: expected a string, got 5\n"
        "f.toml:7:8: sources.s.host: error: no such host hunter2\n"
        "f.toml: 2 error(s), 0 warning(s)",
        ["hunter2", ""],
    )
    assert "got 5" not in out and "hunter2" not in out
    assert "f.toml:3:12: uplink.password: error: (message hidden" in out
    assert "sources.s.host: error: no such host ********" in out
    assert out.endswith("2 error(s), 0 warning(s)")


# --- the example inventory, lint, syntax ----------------------------------------------------------

def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Ansible's combine(recursive=true): mappings merged, everything else replaced."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_the_example_inventory_renders_a_configuration_flux_edge_accepts(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml") if not os.environ.get("CI") else __import__("yaml")
    site = yaml.safe_load((EXAMPLE / "group_vars" / "plant_a" / "main.yml").read_text())
    host = yaml.safe_load((EXAMPLE / "host_vars" / "gw1.yml").read_text())
    base = {"daemon": {"name": "gw1", "plugin_dirs": ["plugins"]}}  # the role's template
    config = _merge(_merge(base, site["flux_edge_config"]), host["flux_edge_config_host"])
    config = _merge(config, {"uplink": {"password": "from-the-vault"}})
    (tmp_path / "tls").mkdir()
    for item in site["flux_edge_tls_files"]:  # what the role installs before validating
        (tmp_path / "tls" / item["name"]).write_text("placeholder\n")
    (tmp_path / "flux-edge.toml").write_text(to_toml(config))
    r = subprocess.run([sys.executable, "-m", "flux_edge", "check-config",
                        str(tmp_path / "flux-edge.toml")], capture_output=True, text=True,
                       check=False, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert tomllib.loads((tmp_path / "flux-edge.toml").read_text())["daemon"]["name"] == \
        "plant-a-gw1"


def test_ansible_lint_production_profile_and_syntax_check() -> None:
    lint = need_tool("ansible-lint")
    playbook = need_tool("ansible-playbook")
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    r = subprocess.run([lint, "--offline", "--profile", "production"], cwd=ANSIBLE_DIR, env=env,
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr
    r = subprocess.run([playbook, "--syntax-check", "site.yml"], cwd=ANSIBLE_DIR, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the real run ---------------------------------------------------------------------------------

# A GPS receiver on a pty, owned root:dialout 0660 like a real USB adapter; /dev/ttyFAKEGPS points
# at it. Runs inside the container as a transient unit.
FAKE_GPS = r'''
import grp, os, time
master, slave = os.openpty()
name = os.ttyname(slave)
os.chown(name, 0, grp.getgrnam("dialout").gr_gid)
os.chmod(name, 0o660)
if os.path.lexists("/dev/ttyFAKEGPS"):
    os.unlink("/dev/ttyFAKEGPS")
os.symlink(name, "/dev/ttyFAKEGPS")
i = 0
while True:
    body = f"GPGGA,1200{i % 60:02d}.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
    check = 0
    for ch in body.encode():
        check ^= ch
    os.write(master, f"${body}*{check:02X}\r\n".encode())
    i += 1
    time.sleep(0.2)
'''

# Opens a device no unit may open under DevicePolicy=closed: EPERM proves the policy is enforced.
DEVICE_PROBE = r'''
import os, stat
try:
    if os.path.exists("/dev/net/tun"):
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    else:
        os.mknod("/run/flux-probe", 0o600 | stat.S_IFCHR, os.makedev(10, 200))
    print("open")
except PermissionError:
    print("denied")
'''

INVENTORY = """\
all:
  children:
    flux_edge_gateways:
      children:
        test_site:
          hosts:
            gw-test:
              ansible_connection: community.docker.nsenter
              ansible_nsenter_pid: {pid}
              ansible_become: false
              ansible_python_interpreter: /usr/bin/python3
"""

CHROOT_INVENTORY = """\
all:
  children:
    flux_edge_gateways:
      children:
        test_site:
          hosts:
            {root}:
              ansible_connection: community.general.chroot
              ansible_become: false
              ansible_python_interpreter: /usr/bin/python3
              flux_edge_manage_service: false
              flux_edge_gateway_name: ""
"""

SITE_VARS = """\
flux_edge_wheelhouse: {wheelhouse}
flux_edge_mosquitto: true
flux_edge_plugins: [{plugin}]
flux_edge_uplink_password: "{{{{ vault_flux_edge_uplink_password }}}}"
flux_edge_tls_files:
  - {{name: client.key, content: "{{{{ vault_flux_edge_client_key }}}}"}}
flux_edge_config:
  plugins:
    json_normalize:
      config:
        fields: [{{path: t, name: temp, unit: "°C"}}]
    nmea0183: {{}}
    site_scale:                       # the user plugin, found in /etc/flux-edge/plugins
      config: {{scale: 0.1}}
  sources:
    sensors:                          # devices publishing to the gateway's own mosquitto
      type: mqtt
      topics: [{{topic: "test/+/data", qos: 1}}]
      device_from_topic: "test/{{device}}/data"
      chain: [json_normalize]
    meter:                            # nothing listens there: the device is reported bad
      type: modbus_tcp
      host: 127.0.0.1
      port: 1502
      interval: 2s
      chain: [site_scale]
      registers:
        - {{name: r_0, address: 0, type: int16}}
    gps:
      type: serial
      port: /dev/ttyFAKEGPS
      delimiter: "\\r\\n"
      chain: [nmea0183]
  uplink:
    host: 127.0.0.1
    port: 1883
    username: gw-test
"""

SECRET = "uplink-pw-7f3a9c"
VAULT = f"""\
vault_flux_edge_uplink_password: "{SECRET}"
vault_flux_edge_client_key: |
  -----BEGIN PRIVATE KEY-----
  not-a-real-key-{SECRET}
  -----END PRIVATE KEY-----
"""

ARCHES = {"x86_64": ("amd64", "x86_64"), "aarch64": ("arm64", "aarch64")}


def recap(output: str, host: str = "gw-test") -> dict[str, int]:
    m = re.search(rf"^{re.escape(host)}\s*:\s*(ok=.*)$", output, re.M)
    assert m, f"no PLAY RECAP line for {host}:\n{output[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def timed(timer: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    try:
        return fn()
    finally:
        timer[name] = time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_the_role_provisions_a_booted_bookworm_system(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mmdebstrap and systemd-nspawn build and boot a Debian system")
    from tests.support.nspawn import Container, build_rootfs, missing_tools

    missing = missing_tools()
    if missing:
        message = f"missing {', '.join(missing)} (apt-get install mmdebstrap systemd-container)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    playbook = need_tool("ansible-playbook")
    vault_tool = need_tool("ansible-vault")
    if platform.machine() not in ARCHES:
        pytest.skip(f"no Debian rootfs/wheelhouse mapping for {platform.machine()}")
    deb_arch, wheel_arch = ARCHES[platform.machine()]
    user_plugin = tmp_path / "site_scale.wasm"
    shutil.copy(bundled_wasm("c_scale"), user_plugin)  # a plugin that is not bundled by that name

    times: dict[str, float] = {}
    root = tmp_path / "root"
    wheelhouse = tmp_path / "wheelhouse"
    box: Container | None = None
    try:
        # 1. the device's root filesystem and the controller's wheelhouse, side by side
        #    (both mostly wait on the network)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            rootfs = pool.submit(timed, times, "rootfs", lambda: build_rootfs(
                root, ["python3", "python3-venv", "procps", "mosquitto"], arch=deb_arch))
            wheels = pool.submit(timed, times, "wheelhouse", lambda: subprocess.run(
                ["bash", str(ROOT / "tools" / "build-wheelhouse.sh"), wheel_arch, str(wheelhouse)],
                capture_output=True, text=True, timeout=300, check=True))
            rootfs.result()
            try:
                wheels.result()
            except subprocess.CalledProcessError as e:
                pytest.fail(f"build-wheelhouse.sh failed:\n{e.stdout}{e.stderr}")
        (root / "root" / "fakegps.py").write_text(FAKE_GPS)
        image_root = tmp_path / "image-root"  # a pristine copy, provisioned as an image build does
        subprocess.run(["cp", "-a", str(root), str(image_root)], check=True)

        # 2. boot it
        box = Container(root, name=f"flux-ansible-{os.getpid()}", log=tmp_path / "console.log")
        timed(times, "boot", box.start)
        box.run("systemd-run", "--unit=fakegps", "--", "python3", "/root/fakegps.py")

        # 3. the inventory: a site group with its vault, a host with its overrides
        inv = tmp_path / "inventory"
        (inv / "group_vars" / "test_site").mkdir(parents=True)
        (inv / "host_vars").mkdir()
        (inv / "hosts.yml").write_text(INVENTORY.format(pid=box.pid))
        (inv / "group_vars" / "test_site" / "main.yml").write_text(
            SITE_VARS.format(wheelhouse=wheelhouse, plugin=user_plugin))
        (inv / "host_vars" / "gw-test.yml").write_text(
            "flux_edge_config_host:\n  daemon:\n    name: gw-test-host\n")
        vault_file = inv / "group_vars" / "test_site" / "vault.yml"
        vault_file.write_text(VAULT)
        password_file = tmp_path / "vault-password"
        password_file.write_text("test-vault-password\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
        env.update(ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
                   ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
                   PATH=f"{BIN}:{os.environ['PATH']}")
        subprocess.run([vault_tool, "encrypt", "--vault-password-file", str(password_file),
                        str(vault_file)], env=env, check=True, capture_output=True)
        assert SECRET not in vault_file.read_text()

        runs = 0

        def apply(*extra: str) -> tuple[int, str]:
            nonlocal runs
            runs += 1
            inventory = [] if "-i" in extra else ["-i", str(inv)]
            r = subprocess.run(
                [playbook, *inventory, "site.yml", "--vault-password-file", str(password_file),
                 *extra],
                cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=300,
                check=False)
            out = r.stdout + r.stderr
            (tmp_path / f"run{runs}.log").write_text(out)
            assert SECRET not in out, f"run {runs} printed a vault secret"
            return r.returncode, out

        def show(*props: str) -> dict[str, str]:
            assert box is not None
            return box.show("flux-edge.service", *props)

        def http(path: str) -> tuple[int, str]:
            assert box is not None
            r = box.run("python3", "-c", (
                "import sys, urllib.request, urllib.error\n"
                "try:\n"
                f"    r = urllib.request.urlopen('http://127.0.0.1:9180{path}', timeout=5)\n"
                "    print(r.status); print(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code); print(e.read().decode())\n"), check=False)
            status, _, body = r.stdout.partition("\n")
            return (int(status) if status.isdigit() else 0), body

        def wait_metrics(pred: Callable[[str], bool], what: str, timeout: float = 20) -> str:
            deadline = time.monotonic() + timeout
            while True:
                status, body = http("/metrics")
                try:
                    if status == 200 and pred(body):
                        return body
                except KeyError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out waiting for {what}; metrics:\n{body[-3000:]}")
                time.sleep(0.3)

        # 4. first run: everything installed, the service up
        rc, out = timed(times, "first run", apply)
        assert rc == 0, out[-6000:]
        assert recap(out)["changed"] > 0
        state = show("ActiveState", "SubState", "Type", "WatchdogUSec", "NRestarts", "MainPID")
        assert state["ActiveState"] == "active" and state["SubState"] == "running", state
        assert state["Type"] == "notify"  # so "active" means READY=1 was received
        assert state["WatchdogUSec"] not in ("0", "infinity", ""), state  # armed
        assert state["NRestarts"] == "0"
        pid = state["MainPID"]
        assert "mosquitto.service" in show("After")["After"]  # the role's drop-in
        status, body = http("/healthz")
        assert status == 200, body
        assert '"status": "ok"' in body

        # files, owners, modes
        group_line = next(line for line in (root / "etc" / "group").read_text().splitlines()
                          if line.startswith("flux-edge:"))
        gid = int(group_line.split(":")[2])
        cache = sorted(p.name.split(".")[0] for p in
                       (root / "var" / "lib" / "flux-edge" / "cache").glob("*.cwasm"))
        assert cache == ["json_normalize", "nmea0183", "site_scale"], cache
        key = root / "etc" / "flux-edge" / "tls" / "client.key"
        st_key = key.stat()
        assert (st_key.st_mode & 0o777, st_key.st_uid, st_key.st_gid) == (0o640, 0, gid)
        assert f"not-a-real-key-{SECRET}" in key.read_text()
        live = root / "etc" / "flux-edge" / "flux-edge.toml"
        st_live = live.stat()
        assert (st_live.st_mode & 0o777, st_live.st_uid, st_live.st_gid) == (0o640, 0, gid)
        config = tomllib.loads(live.read_text())
        assert config["uplink"]["password"] == SECRET  # from the vault
        assert config["daemon"]["name"] == "gw-test-host"  # host_vars over group_vars
        assert (root / "etc" / "flux-edge" / "plugins" / "site_scale.wasm").is_file()
        rule = (root / "etc" / "udev" / "rules.d" / "99-flux-edge-serial.rules").read_text()
        assert 'DRIVERS=="ftdi_sio", ATTR{latency_timer}="1"' in rule
        user = box.run("id", "flux-edge").stdout
        assert "(dialout)" in user, user
        assert box.run("getent", "passwd", "flux-edge").stdout.strip().endswith(
            ":/var/lib/flux-edge:/usr/sbin/nologin")

        # the serial source reads the pty under DevicePolicy=closed, and the policy is enforced
        # here (ptys are in systemd's built-in allow list of the closed policy)
        probe = box.run("systemd-run", "--wait", "--pipe", "--quiet", "-p", "DevicePolicy=closed",
                        "--", "python3", "-c", DEVICE_PROBE)
        assert probe.stdout.strip() == "denied", "DevicePolicy is not enforced in the container"
        assert show("DevicePolicy")["DevicePolicy"] == "closed"
        wait_metrics(lambda m: metric(m, "flux_edge_device_up", 'source="gps"') == 1
                     and metric(m, "flux_edge_device_polls_total", 'source="gps"') >= 3,
                     "the gps source on the pty")
        # the local mosquitto feeds the mqtt source, and the uplink (vault password) delivers
        box.run("/opt/flux-edge/venv/bin/python", "-c",
                "import paho.mqtt.publish as p; p.single('test/dev1/data', '{\"t\": 21.5}', "
                "qos=1, hostname='127.0.0.1', port=1883)")
        wait_metrics(lambda m: metric(m, "flux_edge_device_polls_total", 'source="sensors"') >= 1
                     and metric(m, "flux_edge_uplink_connected") == 1
                     and metric(m, "flux_edge_uplink_acked_total") > 0,
                     "an MQTT message in and measurements acknowledged upstream")

        # 5. second run: nothing to do
        rc, out = timed(times, "second run", apply)
        assert rc == 0, out[-6000:]
        assert recap(out)["changed"] == 0, out[-6000:]
        assert show("MainPID")["MainPID"] == pid

        # 6. a valid change of the configuration only: applied by reload (SIGHUP), same process
        rc, out = timed(times, "reload run", lambda: apply(
            "-e", '{"flux_edge_config_host": {"daemon": {"name": "gw-test-host"},'
                  ' "sources": {"meter": {"interval": "3s"}}}}'))
        assert rc == 0, out[-6000:]
        assert re.search(r"RUNNING HANDLER \[flux_edge : Reload flux-edge\] \*+\nchanged", out), \
            out[-4000:]
        assert "RUNNING HANDLER [flux_edge : Restart flux-edge]" not in out
        assert tomllib.loads(live.read_text())["sources"]["meter"]["interval"] == "3s"
        state = show("ActiveState", "MainPID", "NRestarts")
        assert state == {"ActiveState": "active", "MainPID": pid, "NRestarts": "0"}, state
        good = live.read_bytes()

        # 7. a broken configuration: the play fails at validation, nothing else changes
        rc, out = timed(times, "broken run", lambda: apply(
            "-e", '{"flux_edge_config_host": {"sources": {"meter": {"port": 70000}}}}'))
        assert rc != 0
        assert "check-config refused the new configuration" in out, out[-4000:]
        assert "sources.meter.port: error: must be between 1 and 65535" in out
        assert recap(out)["failed"] == 1
        assert live.read_bytes() == good
        assert not (root / "etc" / "flux-edge" / "flux-edge.toml.new").exists()
        state = show("ActiveState", "MainPID", "NRestarts")
        assert state == {"ActiveState": "active", "MainPID": pid, "NRestarts": "0"}, state

        # 8. watchdog: a stopped daemon is killed and restarted by systemd. Test-only drop-in:
        #    WatchdogSec=5s instead of the unit's 45 s, so the test waits seconds, not a minute.
        dropin = root / "etc" / "systemd" / "system" / "flux-edge.service.d"
        dropin.mkdir(parents=True, exist_ok=True)  # the role made it (local mosquitto)
        (dropin / "zz-test-watchdog.conf").write_text("[Service]\nWatchdogSec=5s\n")
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "flux-edge.service")
        before = show("MainPID", "NRestarts", "WatchdogUSec")
        assert before["WatchdogUSec"] == "5s"
        t0 = time.monotonic()
        box.run("sh", "-c", f"kill -STOP {before['MainPID']}")
        deadline = t0 + 40
        while True:
            after = show("ActiveState", "MainPID", "NRestarts", "Result")
            if (after["NRestarts"] == str(int(before["NRestarts"]) + 1)
                    and after["ActiveState"] == "active"):
                break
            assert time.monotonic() < deadline, f"no watchdog restart: {after}"
            time.sleep(0.3)
        times["watchdog restart"] = time.monotonic() - t0
        assert after["MainPID"] != before["MainPID"]
        journal = box.run("journalctl", "-u", "flux-edge", "--no-pager", "-o", "cat").stdout
        assert "Watchdog timeout" in journal
        assert http("/healthz")[0] == 200

        # 9. the image build's way: a chroot (no systemd running), flux_edge_manage_service false;
        #    the unit ends enabled, nothing is started, and the name is left to the host name
        chroot_inv = tmp_path / "inventory-chroot"
        chroot_inv.mkdir()
        (chroot_inv / "group_vars").symlink_to(inv / "group_vars")
        (chroot_inv / "hosts.yml").write_text(CHROOT_INVENTORY.format(root=image_root))
        rc, out = timed(times, "chroot run", lambda: apply("-i", str(chroot_inv)))
        assert rc == 0, out[-6000:]
        assert not re.search(r"RUNNING HANDLER \[flux_edge : (Restart|Reload) [^]]*\] \*+\nchanged",
                             out)
        wants = image_root / "etc" / "systemd" / "system" / "multi-user.target.wants"
        assert os.readlink(wants / "flux-edge.service") == "/etc/systemd/system/flux-edge.service"
        image_config = tomllib.loads((image_root / "etc/flux-edge/flux-edge.toml").read_text())
        assert "name" not in image_config["daemon"]
        assert (image_root / "opt/flux-edge/venv/bin/flux-edge").is_file()
    finally:
        if box is not None:
            timed(times, "stop", box.stop)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmp_path / "image-root", ignore_errors=True)
        print("timings:", ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
