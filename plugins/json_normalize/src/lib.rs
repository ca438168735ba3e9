//! json_normalize: maps fields of vendor JSON payloads (kind 0, or kind 2 from a previous
//! plugin) to measurements. See README.md for the config.

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::{self, Map, Value as Json};
use flux_plugin_sdk::KIND_REGISTERS;

/// One step of a field path: `data.values[0].t` -> Key(data), Key(values), Index(0), Key(t).
/// A plain numeric segment (`values.0`) also indexes arrays.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone)]
struct Path {
    text: String,
    steps: Vec<Step>,
}

impl Path {
    fn parse(text: &str) -> Result<Path, String> {
        let mut steps = Vec::new();
        if text.is_empty() {
            return Err("path is empty".to_string());
        }
        for segment in text.split('.') {
            let (key, mut rest) = match segment.find('[') {
                Some(i) => (&segment[..i], &segment[i..]),
                None => (segment, ""),
            };
            if key.is_empty() && rest.is_empty() {
                return Err(format!("path {:?} has an empty segment", text));
            }
            if !key.is_empty() {
                steps.push(Step::Key(key.to_string()));
            }
            while !rest.is_empty() {
                let close = rest.find(']').ok_or_else(|| format!("path {:?}: unclosed [", text))?;
                let index = rest[1..close]
                    .parse::<usize>()
                    .map_err(|_| format!("path {:?}: [{}] is not an array index", text, &rest[1..close]))?;
                steps.push(Step::Index(index));
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return Err(format!("path {:?}: unexpected {:?} after ]", text, rest));
                }
            }
        }
        Ok(Path { text: text.to_string(), steps })
    }

    /// The value at this path, if every step exists (`null` counts as missing).
    fn get<'a>(&self, root: &'a Json) -> Option<&'a Json> {
        let mut v = root;
        for step in &self.steps {
            v = match (step, v) {
                (Step::Key(k), Json::Object(m)) => m.get(k)?,
                (Step::Key(k), Json::Array(a)) => a.get(k.parse::<usize>().ok()?)?,
                (Step::Index(i), Json::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        if v.is_null() {
            None
        } else {
            Some(v)
        }
    }

    fn last_key(&self) -> Option<&str> {
        self.steps.iter().rev().find_map(|s| match s {
            Step::Key(k) => Some(k.as_str()),
            Step::Index(_) => None,
        })
    }
}

struct Field {
    path: Path,
    name: String,
    unit: String,
    scale: f64,
    offset: f64,
    required: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum TsUnit {
    Auto,
    Seconds,
    Millis,
}

pub struct Normalizer {
    fields: Vec<Field>,
    device_path: Option<Path>,
    ts_path: Option<Path>,
    ts_unit: TsUnit,
}

const FIELD_KEYS: &str = "path, name, unit, scale, offset, required";

fn number(obj: &Map<String, Json>, key: &str, default: f64) -> Result<f64, String> {
    match obj.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("{} must be a finite number, got {}", key, v)),
    }
}

fn string<'a>(obj: &'a Map<String, Json>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(v) => Err(format!("{} must be a string, got {}", key, v)),
    }
}

fn parse_field(obj: &Map<String, Json>) -> Result<Field, String> {
    if let Some(k) = obj.keys().find(|k| !FIELD_KEYS.split(", ").any(|f| f == k.as_str())) {
        return Err(format!("unknown key {:?} (expected {})", k, FIELD_KEYS));
    }
    let path = Path::parse(string(obj, "path")?.ok_or("path is missing")?)?;
    let name = match string(obj, "name")? {
        Some(n) if !n.is_empty() => n.to_string(),
        Some(_) => return Err("name is empty".to_string()),
        None => path.last_key().ok_or("name is missing and the path ends in no key")?.to_string(),
    };
    let required = match obj.get("required") {
        None => false,
        Some(Json::Bool(b)) => *b,
        Some(v) => return Err(format!("required must be true or false, got {}", v)),
    };
    Ok(Field {
        path,
        name,
        unit: string(obj, "unit")?.unwrap_or("").to_string(),
        scale: number(obj, "scale", 1.0)?,
        offset: number(obj, "offset", 0.0)?,
        required,
    })
}

fn init(cfg: &Json) -> Result<Normalizer, String> {
    let cfg = cfg.as_object().ok_or("config must be a JSON object")?;
    let list = cfg
        .get("fields")
        .ok_or("fields is missing: give a list like [{ path = \"data.temp\", name = \"temperature\" }]")?
        .as_array()
        .ok_or("fields must be a list of tables")?;
    if list.is_empty() {
        return Err("fields is empty: nothing to normalize".to_string());
    }
    let mut fields = Vec::with_capacity(list.len());
    let mut problems = Vec::new();
    for (i, item) in list.iter().enumerate() {
        match item.as_object().ok_or_else(|| format!("must be a table, got {}", item)).and_then(parse_field) {
            Ok(f) => fields.push(f),
            Err(e) => problems.push(format!("fields[{}]: {}", i, e)),
        }
    }
    let optional_path = |key: &str, problems: &mut Vec<String>| match string(cfg, key) {
        Ok(Some(p)) => Path::parse(p).map(Some).unwrap_or_else(|e| {
            problems.push(format!("{}: {}", key, e));
            None
        }),
        Ok(None) => None,
        Err(e) => {
            problems.push(e);
            None
        }
    };
    let device_path = optional_path("device_path", &mut problems);
    let ts_path = optional_path("ts_path", &mut problems);
    let ts_unit = match string(cfg, "ts_unit") {
        Ok(None) | Ok(Some("auto")) => TsUnit::Auto,
        Ok(Some("s")) => TsUnit::Seconds,
        Ok(Some("ms")) => TsUnit::Millis,
        Ok(Some(other)) => {
            problems.push(format!("ts_unit must be \"auto\", \"s\" or \"ms\", got {:?}", other));
            TsUnit::Auto
        }
        Err(e) => {
            problems.push(e);
            TsUnit::Auto
        }
    };
    if !problems.is_empty() {
        return Err(format!("invalid config: {}", problems.join("; ")));
    }
    Ok(Normalizer { fields, device_path, ts_path, ts_unit })
}

/// serde_json reports line/column (1-based, columns counted in bytes); turn that into the
/// 0-based byte offset of the offending byte (the payload length when the input ended early).
fn byte_offset(payload: &[u8], e: &serde_json::Error) -> usize {
    if e.is_eof() {
        return payload.len();
    }
    let (line, column) = (e.line(), e.column());
    let mut start = 0;
    for _ in 1..line {
        match payload[start..].iter().position(|&b| b == b'\n') {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    (start + column.saturating_sub(1)).min(payload.len())
}

fn json_error(payload: &[u8], e: &serde_json::Error) -> String {
    let text = e.to_string();
    let reason = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text.as_str(),
    };
    format!("invalid JSON at byte {}: {}", byte_offset(payload, e), reason)
}

fn kind_of(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a bool",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn process(n: &mut Normalizer, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind == KIND_REGISTERS {
        return Err("expected a JSON payload (kind 0 or 2), got register words (kind 1)".to_string());
    }
    let doc: Json = serde_json::from_slice(m.payload).map_err(|e| json_error(m.payload, &e))?;

    let ts = match n.ts_path.as_ref().and_then(|p| p.get(&doc).map(|v| (p, v))) {
        None => None,
        Some((p, v)) => {
            let t = v
                .as_f64()
                .ok_or_else(|| format!("ts_path {} is {}, expected unix seconds or milliseconds", p.text, kind_of(v)))?;
            let ms = match n.ts_unit {
                TsUnit::Millis => true,
                TsUnit::Seconds => false,
                // 1e11 s is the year 5138; 1e11 ms is 1973.
                TsUnit::Auto => t.abs() >= 1e11,
            };
            Some(if ms { t / 1000.0 } else { t })
        }
    };
    let device_text;
    let device = match n.device_path.as_ref().and_then(|p| p.get(&doc)) {
        None => None,
        Some(Json::String(s)) => Some(s.as_str()),
        Some(v @ Json::Number(_)) => {
            device_text = v.to_string();
            Some(device_text.as_str())
        }
        Some(v) => return Err(format!("device_path {} is {}, expected a string", n.device_path.as_ref().map_or("", |p| p.text.as_str()), kind_of(v))),
    };

    for f in &n.fields {
        let v = match f.path.get(&doc) {
            Some(v) => v,
            None if f.required => {
                out.error(format_args!("required field {:?} (path {}) is missing", f.name, f.path.text));
                continue;
            }
            None => continue,
        };
        let value = match v {
            Json::Number(x) => match x.as_f64() {
                Some(x) => Value::F64(x * f.scale + f.offset),
                None => {
                    out.error(format_args!("field {:?} (path {}): {} is not representable", f.name, f.path.text, x));
                    continue;
                }
            },
            Json::Bool(b) => Value::Bool(*b),
            Json::String(s) => Value::Str(s),
            other => {
                out.error(format_args!(
                    "field {:?} (path {}) is {}, expected a number, bool or string",
                    f.name,
                    f.path.text,
                    kind_of(other)
                ));
                continue;
            }
        };
        out.measurement_ex(&f.name, value, &f.unit, Quality::Good, device, ts);
    }
    Ok(())
}

flux_plugin! { state: Normalizer, init_json: init, process: process }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = Path::parse("data.values[0].t").unwrap();
        assert_eq!(p.steps, vec![Step::Key("data".into()), Step::Key("values".into()), Step::Index(0), Step::Key("t".into())]);
        let doc: Json = serde_json::from_str(r#"{"data": {"values": [{"t": 1}], "m": [[5, 6]]}}"#).unwrap();
        assert_eq!(p.get(&doc), Some(&Json::from(1)));
        assert_eq!(Path::parse("data.values.0.t").unwrap().get(&doc), Some(&Json::from(1)));
        assert_eq!(Path::parse("data.m[0][1]").unwrap().get(&doc), Some(&Json::from(6)));
        assert_eq!(Path::parse("data.nope").unwrap().get(&doc), None);
        for bad in ["", "a..b", "a[", "a[x]", "a[0]b", "a."] {
            assert!(Path::parse(bad).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn offsets() {
        for (text, want) in [("{\"a\": x}", 6), ("{\"a\": 1", 7), ("", 0), ("{\n  \"a\": 1,\n  \"b\" 2}", 18)] {
            let e = serde_json::from_str::<Json>(text).unwrap_err();
            assert_eq!(byte_offset(text.as_bytes(), &e), want, "{:?} {}", text, e);
        }
    }
}
