//! The optional `flux_act` export (docs/plugin-abi.md, "Actions"): a command in, bytes out.

use crate::log::{log_str, Level};

/// One command of a `wasm` action, parsed from the JSON the host passes to `flux_act`.
/// The cause fields (`device`, `name`, `value`, `unit`, `quality`) are empty (`value` is
/// `Null`) when the command has no cause.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub rule: String,
    pub action: String,
    pub ts: f64,
    pub device: String,
    pub name: String,
    pub value: serde_json::Value,
    pub unit: String,
    pub quality: String,
    pub params: serde_json::Value,
}

fn text(obj: &serde_json::Map<String, serde_json::Value>, key: &str) -> String {
    obj.get(key).and_then(|v| v.as_str()).unwrap_or("").to_string()
}

impl Command {
    /// Parses the host's JSON object; unknown keys are ignored, missing ones are empty.
    pub fn parse(input: &[u8]) -> Result<Command, String> {
        let value: serde_json::Value =
            serde_json::from_slice(input).map_err(|e| format!("command is not valid JSON: {}", e))?;
        let obj = value.as_object().ok_or_else(|| "command is not a JSON object".to_string())?;
        Ok(Command {
            rule: text(obj, "rule"),
            action: text(obj, "action"),
            ts: obj.get("ts").and_then(|v| v.as_f64()).unwrap_or(0.0),
            device: text(obj, "device"),
            name: text(obj, "name"),
            value: obj.get("value").cloned().unwrap_or(serde_json::Value::Null),
            unit: text(obj, "unit"),
            quality: text(obj, "quality"),
            params: obj.get("params").cloned().unwrap_or_else(|| serde_json::Value::Object(Default::default())),
        })
    }
}

static mut ACT_OUT: Vec<u8> = Vec::new();

/// Body of `flux_act`: parses the command, calls `f`, keeps its bytes until the next call and
/// returns `(ptr << 32) | len` (0 for nothing to send); an error is logged at error level and
/// refuses the command (-1).
///
/// # Safety
/// `ptr`/`len` must describe readable guest memory (the host's input buffer); not reentrant.
pub unsafe fn run_act(ptr: *const u8, len: usize, f: impl FnOnce(&Command) -> Result<Vec<u8>, String>) -> i64 {
    let input = if len == 0 || ptr.is_null() { &[][..] } else { core::slice::from_raw_parts(ptr, len) };
    let result = Command::parse(input).and_then(|cmd| f(&cmd));
    // SAFETY: wasm32 guests are single-threaded and flux_act is not reentrant.
    let buf = &mut *core::ptr::addr_of_mut!(ACT_OUT);
    match result {
        Ok(bytes) => {
            *buf = bytes;
            if buf.is_empty() {
                0
            } else {
                (((buf.as_ptr() as usize as u64) << 32) | buf.len() as u64) as i64
            }
        }
        Err(msg) => {
            log_str(Level::Error, &msg);
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_parses_and_defaults_missing_fields() {
        let cmd = Command::parse(br#"{"rule":"hot","action":"frame","ts":2.5,"device":"b1","value":81.5,"extra":1}"#).unwrap();
        assert_eq!(cmd.rule, "hot");
        assert_eq!(cmd.action, "frame");
        assert_eq!(cmd.ts, 2.5);
        assert_eq!(cmd.device, "b1");
        assert_eq!(cmd.value, serde_json::json!(81.5));
        assert_eq!(cmd.name, "");
        assert_eq!(cmd.params, serde_json::json!({}));
        assert!(Command::parse(b"[1]").unwrap_err().contains("not a JSON object"));
        assert!(Command::parse(b"{").unwrap_err().contains("not valid JSON"));
    }
}
