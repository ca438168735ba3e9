//! vendor_frame: an action-only plugin (exports `flux_act`, not `flux_process`).
//!
//! For each command it builds the frame of a (fictional) vendor's serial protocol:
//!
//! ```text
//! STX (0x02)  ASCII "<device>:<action>:<value>"  ETX (0x03)  LRC
//! ```
//!
//! LRC is the XOR of the bytes between STX and ETX (the ASCII text). `value` is the command's
//! cause value as JSON text (`81.5`, `true`; a string without its quotes), or, when the config
//! sets `value`, that fixed text (a command to switch something on, say). The text may not
//! contain STX or ETX.

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::Command;

const STX: u8 = 0x02;
const ETX: u8 = 0x03;

struct State {
    fixed_value: Option<String>,
}

fn init(cfg: &Json) -> Result<State, String> {
    let fixed_value = match cfg.get("value") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    Ok(State { fixed_value })
}

/// The frame for `text`: STX, text, ETX, then the XOR of the text's bytes.
fn frame(text: &str) -> Result<Vec<u8>, String> {
    if text.bytes().any(|b| b == STX || b == ETX) {
        return Err(format!("cannot frame {:?}: it contains STX or ETX", text));
    }
    let mut out = Vec::with_capacity(text.len() + 3);
    out.push(STX);
    out.extend_from_slice(text.as_bytes());
    out.push(ETX);
    out.push(text.bytes().fold(0u8, |lrc, b| lrc ^ b));
    Ok(out)
}

fn act(state: &mut State, cmd: &Command) -> Result<Vec<u8>, String> {
    if cmd.device.is_empty() {
        return Err(format!("command of rule {:?} has no device to address", cmd.rule));
    }
    let value = match (&state.fixed_value, &cmd.value) {
        (Some(fixed), _) => fixed.clone(),
        (None, Json::String(s)) => s.clone(),
        (None, Json::Null) => return Err(format!("command of rule {:?} has no value", cmd.rule)),
        (None, other) => other.to_string(),
    };
    frame(&format!("{}:{}:{}", cmd.device, cmd.action, value))
}

flux_plugin! { state: State, init_json: init, act: act }
