"""Which plugin instances a configuration needs, and the one call that loads one.

A source's chain gets one instance per plugin and per device it serves (a Modbus bus: one for each
device, which learns that device's register map; other sources: one for the source); a wasm action
gets one instance of its plugin. Each instance is told at init who it serves: ABI v1's ``source``
object (docs/plugin-abi.md), merged into the plugin's own ``config`` table.

The pipeline builds its chains and wasm actions from ``plugin_instances``; a reload loads the same
list on the side first (``preload``) so that a broken or changed .wasm fails before the running
pipeline is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux_edge.config import ActionSpec, Config, SourceSpec, resolve_plugin_path
from flux_edge.plugins.host import Plugin, PluginHost, PluginLimits


@dataclass(frozen=True, slots=True)
class Instance:
    """One plugin instance the configuration needs."""

    plugin: str  # the [plugins.NAME] it instantiates
    owner: str  # the source or action it serves
    device: str  # the device of a Modbus source it serves; "" = the whole source, or an action
    context: dict[str, Any]  # ABI v1's ``source`` object, given to the plugin at init

    @property
    def is_action(self) -> bool:
        return self.context.get("type") == "action"


def source_context(name: str, cfg: SourceSpec, key: str = "") -> dict[str, Any]:
    """What a plugin instance learns about the source it serves (ABI v1: the ``source`` object):
    the source's name and type, and what its kind adds (a Modbus device's register map, the
    device name of a serial or MQTT source)."""
    ctx: dict[str, Any] = {"name": name, "type": type(cfg).__struct_config__.tag}
    ctx.update(cfg.plugin_context(name, key))
    return ctx


def source_instances(config: Config, sname: str) -> list[Instance]:
    """The chain instances of source ``sname``, chain by chain (a Modbus source: one per
    device), each chain in order."""
    scfg = config.sources[sname]
    return [
        Instance(pname, sname, key, source_context(sname, scfg, key))
        for key in scfg.chain_keys(sname)
        for pname in scfg.chain
    ]


def action_instance(aname: str, acfg: ActionSpec) -> Instance:
    return Instance(acfg.plugin_name(), aname, "", {"name": aname, "type": "action"})


def plugin_instances(config: Config) -> list[Instance]:
    """Every plugin instance ``config`` needs: the sources' chains, then the actions' plugins."""
    out = [inst for sname in config.sources for inst in source_instances(config, sname)]
    out += [
        action_instance(aname, acfg)
        for aname, acfg in config.actions.items()
        if acfg.plugin_name()
    ]
    return out


def load(host: PluginHost, config: Config, instance: Instance) -> Plugin:
    """Load (compile, or take from the cache) and initialise one instance. Raises PluginError
    (or ConfigError when its file cannot be found)."""
    pcfg = config.plugins[instance.plugin]
    init_cfg = dict(pcfg.config)
    init_cfg["source"] = instance.context
    return host.load(
        instance.plugin,
        Path(resolve_plugin_path(config, instance.plugin)),
        PluginLimits.from_config(pcfg),
        init_cfg,
        wasi=pcfg.wasi,
    )


def preload(config: Config, host: PluginHost) -> None:
    """Load and initialise every instance ``config`` needs, then release them. Raises
    PluginError/FluxError for the first one that fails."""
    loaded: list[Plugin] = []
    try:
        for instance in plugin_instances(config):
            loaded.append(load(host, config, instance))
    finally:
        for plugin in loaded:
            plugin.close()
