"""Time that jumps (issue #13): a Raspberry Pi boots at its last saved time and jumps when NTP
syncs. Durations (rule `for`, cooldown, min on/off, rate limits) run on the duration clock, so
an injected wall clock jumping forward by days or back by hours moves none of them; input ages
are taken at arrival; the wall clock is judged synchronised or not."""

from __future__ import annotations

from pathlib import Path

from flux_edge.actions.safety import SafetyLayer
from flux_edge.model import Measurement
from flux_edge.rules import RuleEngine
from flux_edge.state.clock import PLAUSIBLE_AFTER, ClockSync
from tests.unit.test_rule_state import cfg, hot
from tests.unit.test_safety import cmd, make_config, ok, values

DAY = 86_400.0


class Clocks:
    """A duration clock and a wall clock that the test moves independently."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def m(self) -> float:
        return self.mono

    def w(self) -> float:
        return self.wall


def reading(c: Clocks, value: float) -> Measurement:
    return Measurement(device="boiler", name="temperature", value=value, ts=c.wall)


def test_a_for_period_is_not_shortened_by_a_jump_forward_nor_stretched_by_one_back() -> None:
    c = Clocks()
    e = RuleEngine(cfg(hot=hot(for_=30.0)), clock=c.m, wall=c.w)
    assert e.on_measurement(reading(c, 90.0)) == []
    c.advance(10.0)
    c.wall += 3 * DAY  # NTP: three days forward
    assert e.on_measurement(reading(c, 91.0)) == []  # 10 s of 30 only
    assert e.next_deadline() == 130.0
    c.advance(10.0)
    c.wall -= 5 * 3600.0  # and five hours back
    assert e.tick() == []
    c.advance(10.0)
    commands = e.tick()
    assert [x.action for x in commands] == ["fan_on"]
    assert commands[0].ts == c.wall  # commands carry the wall clock's time


def test_a_cooldown_holds_through_wall_clock_jumps() -> None:
    c = Clocks()
    e = RuleEngine(cfg(hot=hot(mode="level", cooldown=60.0)), clock=c.m, wall=c.w)
    assert len(e.on_measurement(reading(c, 90.0))) == 1
    c.advance(5.0)
    c.wall += 2 * DAY
    assert e.on_measurement(reading(c, 90.0)) == []  # still cooling down
    c.advance(60.0)
    assert len(e.on_measurement(reading(c, 90.0))) == 1


def test_input_ages_are_taken_at_arrival() -> None:
    c = Clocks()
    e = RuleEngine(cfg(hot=hot(mode="level", max_age=30.0)), clock=c.m, wall=c.w)
    e.on_measurement(Measurement(device="boiler", name="other", value=1, ts=c.wall))
    assert len(e.on_measurement(reading(c, 90.0))) == 1
    c.wall += 4 * DAY  # a jump after arrival does not make the value stale
    assert e.tick() == []
    c.advance(40.0)  # but 40 s of real time do: the firing waits on a fresh value
    stale = Measurement(device="boiler", name="temperature", value=95.0, ts=c.wall - 40.0)
    assert e.on_measurement(stale) == []


def test_min_on_and_rate_limits_ignore_wall_clock_jumps() -> None:
    c = Clocks()
    layer = SafetyLayer(make_config(min_on=30, max_switches=2, window=3600), clock=c.m, wall=c.w)
    on = cmd("burner_on")
    assert layer.check(on, {}).allowed
    layer.record(on, ok(on))
    c.advance(5.0)
    c.wall += 3 * DAY  # forward: min_on must not be over
    assert not layer.check(cmd("burner_off"), {}).allowed
    c.wall -= 6 * 3600.0  # back by hours: not stretched either
    c.advance(25.0)
    off = cmd("burner_off")
    assert layer.check(off, {}).allowed
    layer.record(off, ok(off))
    # the window counts switches on the duration clock: two in the last hour
    c.advance(60.0)
    c.wall += 10 * DAY
    assert not layer.check(cmd("burner_on"), {}).allowed


def test_safety_snapshot_carries_timers_over_a_restart_and_converts_old_wall_snapshots() -> None:
    c = Clocks()
    layer = SafetyLayer(make_config(min_on=30), clock=c.m, wall=c.w)
    on = cmd("burner_on")
    layer.record(on, ok(on))
    snap = layer.snapshot()
    assert set(snap) == {"burner", ""}
    c.advance(10.0)  # a restart in the same boot: the downtime counts
    again = SafetyLayer(make_config(min_on=30), clock=c.m, wall=c.w)
    again.restore(snap)
    assert not again.check(cmd("burner_off"), {}).allowed
    c.advance(20.0)
    assert again.check(cmd("burner_off"), {}).allowed
    # a snapshot of before (no clock key): wall-clock times, converted
    old = {"burner": {"state": "on", "last_switch": c.wall - 10.0, "history": []}}
    third = SafetyLayer(make_config(min_on=30), clock=c.m, wall=c.w)
    third.restore(old)
    assert not third.check(cmd("burner_off"), {}).allowed
    c.advance(20.0)
    assert third.check(cmd("burner_off"), {}).allowed


def test_stale_inputs_compare_with_the_wall_clock() -> None:
    c = Clocks()
    layer = SafetyLayer(make_config(inputs=("boiler.temperature",), stale_after=10.0, safe="off"),
                        clock=c.m, wall=c.w)

    class Wall:
        def __call__(self) -> float:
            return c.wall

    fresh = values(Wall(), temperature=50)  # type: ignore[arg-type]
    assert layer.stale_actuators(fresh) == []
    assert layer.stale_actuators(values(Wall(), age=11.0, temperature=50)) != []  # type: ignore[arg-type]


def test_clock_sync(tmp_path: Path) -> None:
    flag = tmp_path / "timesync" / "synchronized"
    wall = [PLAUSIBLE_AFTER + 1000.0]
    mono = [0.0]
    sync = ClockSync(flag=flag, wall=lambda: wall[0], mono=lambda: mono[0])
    assert sync.synced()  # no timesyncd here (no directory): a plausible year is enough
    flag.parent.mkdir()
    mono[0] += 20
    assert not sync.synced() and "not synchronised" in sync.reason()
    flag.touch()
    assert sync.synced() and sync.reason() == ""
    wall[0] = 0.0  # 1970: implausible whatever the flag says
    mono[0] += 20
    assert not sync.synced() and "1970" in sync.reason()


def test_records_say_when_the_clock_is_not_synchronised(tmp_path: Path) -> None:
    from flux_edge.uplink.outbox import Outbox

    flag = tmp_path / "timesync" / "synchronized"
    flag.parent.mkdir()
    box = Outbox(tmp_path / "o.sqlite", max_size=1 << 20, gateway="gw", topic="t/{name}")
    sync = box.clock_sync = ClockSync(flag=flag)
    m = Measurement(device="d", name="v", value=1, ts=1.0, source="s")
    box.add([m])
    flag.touch()
    sync._checked = -float("inf")
    box.add([m])
    box.commit()
    unit = box.take(10)
    assert unit is not None
    assert b'"clock":"unsynced"' in unit.rows[0].payload
    assert b'"clock"' not in unit.rows[1].payload
    assert sync.unsynced_stamps == 1
    box.close()


def test_actuator_state_that_cannot_be_saved_is_degraded_and_retried(tmp_path: Path) -> None:
    # issue #13: safety.json on a full or read-only disk: reported, retried on a timer
    import asyncio
    import os

    from flux_edge.config import DaemonConfig
    from flux_edge.plugins.host import PluginHost
    from flux_edge.runtime.pipeline import Pipeline

    config = make_config(min_on=30)
    config = type(config)(sources=config.sources, actions=config.actions,
                          actuators=config.actuators,
                          daemon=DaemonConfig(state_dir=str(tmp_path / "state")))

    async def go() -> None:
        p = Pipeline(config, host=PluginHost(cache_dir=None))
        target = tmp_path / "state" / "safety.json"
        target.mkdir()  # os.replace onto a directory fails: as a read-only file would
        p._safety_backoff.first = 0.01
        p._save_safety()
        assert p.safety_health.degraded and p._safety_retry is not None
        os.rmdir(target)
        for _ in range(200):
            if not p.safety_health.degraded:
                break
            await asyncio.sleep(0.01)
        assert not p.safety_health.degraded and target.is_file()
        p.audit.close()
        p.store.close()

    asyncio.run(go())
