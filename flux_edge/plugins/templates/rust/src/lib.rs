//! {{name}}: a flux-edge plugin (ABI v1).
//!
//! Starting point from `flux-edge plugin new`: every register word of a kind-1 message becomes
//! a measurement `<prefix><address>` = word * scale. Replace `init` and `process` with your
//! own logic; docs/plugin-guide.md walks through it.

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_REGISTERS;

/// What `init` makes of the config; `process` gets it back on every message.
struct State {
    scale: f64,
    prefix: String,
}

/// Called once with the plugin's `config` table (plus a `source` object) as JSON.
/// An `Err` refuses the config: the daemon reports the message and does not start the plugin.
fn init(cfg: &Json) -> Result<State, String> {
    let scale = match cfg.get("scale") {
        None => 1.0,
        Some(v) => v.as_f64().filter(|s| s.is_finite()).ok_or_else(|| format!("scale must be a number, got {}", v))?,
    };
    let prefix = match cfg.get("prefix") {
        None => "r".to_string(),
        Some(v) => v.as_str().ok_or_else(|| format!("prefix must be a string, got {}", v))?.to_string(),
    };
    debug!("{{name}}: scale {}, prefix {:?}", scale, prefix);
    Ok(State { scale, prefix })
}

/// Called once per input message. Write measurements to `out`; an `Err` becomes an error
/// record for this message (the others are unaffected).
fn process(state: &mut State, msg: &Message, out: &mut Output) -> Result<(), String> {
    if msg.kind != KIND_REGISTERS {
        return Err(format!("expected register words (kind 1), got kind {}", msg.kind));
    }
    for (i, word) in msg.registers().enumerate() {
        let name = format!("{}{}", state.prefix, msg.address as usize + i);
        out.measurement(&name, f64::from(word) * state.scale, "");
    }
    Ok(())
}

flux_plugin! { state: State, init_json: init, process: process }
