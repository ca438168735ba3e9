//! sparkplug_b: Sparkplug B payloads (Eclipse Sparkplug 3.0, protobuf `Payload`) from an MQTT
//! source -> measurements. See README.md.
//!
//! Topic: `spBv1.0/<group_id>/<message_type>/<edge_node_id>[/<device_id>]`. Births (NBIRTH,
//! DBIRTH) carry every metric with its name, alias and datatype (and often an `engUnit`
//! property); data messages (NDATA, DDATA) may carry only the alias. The plugin remembers
//! alias -> (name, unit) and name -> unit per edge node from the births it has seen.

use std::collections::BTreeMap;

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_BYTES;

#[derive(Clone, Copy, PartialEq)]
enum DeviceFrom {
    Message,
    Edge,
    Full,
}

#[derive(Default)]
struct Node {
    aliases: BTreeMap<u64, (String, String)>,
    units: BTreeMap<String, String>,
}

pub struct Config {
    device: DeviceFrom,
    alias_error: bool,
    commands: bool,
    online: bool,
    nodes: BTreeMap<String, Node>,
}

/// Births remembered at most (metrics of all nodes): bounds the instance's memory.
const MAX_REMEMBERED: usize = 100_000;

fn init(cfg: &Json) -> Result<Config, String> {
    let obj = cfg.as_object().ok_or("the config must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "device" | "unknown_alias" | "commands" | "online" | "source") {
            return Err(format!("unknown key {:?} (keys: device, unknown_alias, commands, online)", key));
        }
    }
    let device = match obj.get("device").and_then(Json::as_str) {
        None if obj.get("device").map_or(true, Json::is_null) => DeviceFrom::Edge,
        Some("message") => DeviceFrom::Message,
        Some("edge") => DeviceFrom::Edge,
        Some("full") => DeviceFrom::Full,
        _ => return Err(format!("device must be \"edge\", \"full\" or \"message\", got {}", obj["device"])),
    };
    let alias_error = match obj.get("unknown_alias").and_then(Json::as_str) {
        None if obj.get("unknown_alias").map_or(true, Json::is_null) => true,
        Some("error") => true,
        Some("name") => false,
        _ => return Err(format!("unknown_alias must be \"error\" or \"name\", got {}", obj["unknown_alias"])),
    };
    let flag = |key: &str, default: bool| -> Result<bool, String> {
        match obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(v) => Err(format!("{} must be true or false, got {}", key, v)),
        }
    };
    let commands = flag("commands", false)?;
    let online = flag("online", true)?;
    Ok(Config { device, alias_error, commands, online, nodes: BTreeMap::new() })
}

// --- protobuf wire format ------------------------------------------------------------------------

struct Pb<'a> {
    d: &'a [u8],
    p: usize,
}

#[derive(Clone, Copy)]
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

impl<'a> Pb<'a> {
    fn new(d: &'a [u8]) -> Self {
        Pb { d, p: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for k in 0..10 {
            let b = *self.d.get(self.p).ok_or("the payload ends inside a varint")?;
            self.p += 1;
            v |= ((b & 0x7F) as u64) << (7 * k);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".to_string())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.p.checked_add(n).filter(|&e| e <= self.d.len()).ok_or("a field runs past the end of the payload")?;
        let s = &self.d[self.p..end];
        self.p = end;
        Ok(s)
    }

    /// The next field (number, value), or None at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.p >= self.d.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let f = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                let b = self.take(8)?;
                Field::Fixed64(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            }
            2 => {
                let n = self.varint()?;
                Field::Bytes(self.take(usize::try_from(n).map_err(|_| "a length beyond the payload")?)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("wire type {} (groups are not used by Sparkplug B)", w)),
        };
        Ok(Some((key >> 3, f)))
    }
}

// --- the Sparkplug B messages --------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Val<'a> {
    U(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(&'a [u8]),
    /// a dataset, template, extension or bytes: not a measurement
    Other,
}

struct Metric<'a> {
    name: Option<&'a str>,
    alias: Option<u64>,
    timestamp: Option<u64>,
    datatype: u32,
    is_null: bool,
    unit: Option<&'a str>,
    value: Option<Val<'a>>,
}

fn text<'a>(b: &'a [u8], what: &str) -> Result<&'a str, String> {
    core::str::from_utf8(b).map_err(|_| format!("{} is not UTF-8", what))
}

/// `PropertySet { repeated string keys = 1; repeated PropertyValue values = 2; }`: the
/// `engUnit` (or `unit`) string property, if any.
fn unit_property(d: &[u8]) -> Result<Option<&str>, String> {
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut values: Vec<&[u8]> = Vec::new();
    let mut pb = Pb::new(d);
    while let Some((n, f)) = pb.next()? {
        match (n, f) {
            (1, Field::Bytes(b)) => keys.push(b),
            (2, Field::Bytes(b)) => values.push(b),
            _ => {}
        }
    }
    for (k, v) in keys.iter().zip(values.iter()) {
        if *k == b"engUnit" || *k == b"unit" || *k == b"engUnits" {
            // PropertyValue { uint32 type = 1; bool is_null = 2; ... string string_value = 8; }
            let mut pv = Pb::new(v);
            while let Some((n, f)) = pv.next()? {
                if let (8, Field::Bytes(s)) = (n, f) {
                    return Ok(Some(text(s, "a unit property")?));
                }
            }
        }
    }
    Ok(None)
}

fn metric(d: &[u8]) -> Result<Metric<'_>, String> {
    let mut m = Metric { name: None, alias: None, timestamp: None, datatype: 0, is_null: false, unit: None, value: None };
    let mut pb = Pb::new(d);
    while let Some((n, f)) = pb.next()? {
        match (n, f) {
            (1, Field::Bytes(b)) => m.name = Some(text(b, "a metric name")?),
            (2, Field::Varint(v)) => m.alias = Some(v),
            (3, Field::Varint(v)) => m.timestamp = Some(v),
            (4, Field::Varint(v)) => m.datatype = v as u32,
            (7, Field::Varint(v)) => m.is_null = v != 0,
            (9, Field::Bytes(b)) => m.unit = unit_property(b)?,
            (10, Field::Varint(v)) | (11, Field::Varint(v)) => m.value = Some(Val::U(v)),
            (12, Field::Fixed32(v)) => m.value = Some(Val::F32(f32::from_bits(v))),
            (13, Field::Fixed64(v)) => m.value = Some(Val::F64(f64::from_bits(v))),
            (14, Field::Varint(v)) => m.value = Some(Val::Bool(v != 0)),
            (15, Field::Bytes(b)) => m.value = Some(Val::Str(b)),
            (16..=19, _) => m.value = Some(Val::Other),
            (10..=15, _) => return Err(format!("metric field {} has the wrong wire type", n)),
            _ => {} // is_historical, is_transient, metadata: not needed
        }
    }
    Ok(m)
}

/// A float as the sender wrote it: an f32's shortest decimal (0.1f32 -> 0.1, not
/// 0.10000000149011612).
fn f32_value(v: f32) -> f64 {
    let s = format!("{}", v);
    s.parse::<f64>().unwrap_or(v as f64)
}

/// Sparkplug B datatypes: 1-4 Int8..Int64, 5-8 UInt8..UInt64, 9 Float, 10 Double, 11 Boolean,
/// 12 String, 13 DateTime (ms since the epoch), 14 Text, 15 UUID, 16+ DataSet, Bytes, File,
/// Template, PropertySet(List), arrays.
fn value_of<'a>(datatype: u32, v: Val<'a>) -> Result<Option<(Value<'a>, &'static str)>, String> {
    Ok(Some(match (datatype, v) {
        (1, Val::U(x)) => (Value::I64(x as u8 as i8 as i64), ""),
        (2, Val::U(x)) => (Value::I64(x as u16 as i16 as i64), ""),
        (3, Val::U(x)) => (Value::I64(x as u32 as i32 as i64), ""),
        (4, Val::U(x)) => (Value::I64(x as i64), ""),
        (5, Val::U(x)) => (Value::I64(x as u8 as i64), ""),
        (6, Val::U(x)) => (Value::I64(x as u16 as i64), ""),
        (7, Val::U(x)) => (Value::I64(x as u32 as i64), ""),
        (8, Val::U(x)) if x <= i64::MAX as u64 => (Value::I64(x as i64), ""),
        (8, Val::U(x)) => (Value::F64(x as f64), ""),
        (13, Val::U(x)) if x <= i64::MAX as u64 => (Value::I64(x as i64), "ms"),
        (9, Val::F32(x)) | (0, Val::F32(x)) => (Value::F64(f32_value(x)), ""),
        (10, Val::F64(x)) | (0, Val::F64(x)) | (9, Val::F64(x)) => (Value::F64(x), ""),
        (10, Val::F32(x)) => (Value::F64(f32_value(x)), ""),
        (11, Val::Bool(b)) | (0, Val::Bool(b)) => (Value::Bool(b), ""),
        (12, Val::Str(s)) | (14, Val::Str(s)) | (15, Val::Str(s)) | (0, Val::Str(s)) => {
            (Value::Str(core::str::from_utf8(s).map_err(|_| "a string value is not UTF-8".to_string())?), "")
        }
        (0, Val::U(x)) => (Value::I64(x as i64), ""),
        (_, Val::Other) => return Ok(None),
        (t, _) if t >= 16 => return Ok(None),
        (t, _) => return Err(format!("datatype {} with a value of another type", t)),
    }))
}

struct Topic<'a> {
    group: &'a str,
    kind: &'a str,
    node: &'a str,
    device: Option<&'a str>,
}

fn topic(t: &str) -> Option<Topic<'_>> {
    let mut it = t.split('/');
    if it.next()? != "spBv1.0" {
        return None;
    }
    let group = it.next()?;
    let kind = it.next()?;
    let node = it.next()?;
    let device = it.next();
    if it.next().is_some() {
        return None;
    }
    Some(Topic { group, kind, node, device })
}

fn process(cfg: &mut Config, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_BYTES {
        return Err(format!("expected an MQTT payload (kind 0), got kind {} ({})", m.kind, m.kind_name()));
    }
    let t = if m.topic.is_empty() {
        None
    } else {
        match topic(m.topic) {
            Some(t) => Some(t),
            None => return Err(format!("topic {:?} is not spBv1.0/<group>/<type>/<edge node>[/<device>]", m.topic)),
        }
    };
    let kind = t.as_ref().map_or("NDATA", |t| t.kind);
    match kind {
        "NBIRTH" | "DBIRTH" | "NDATA" | "DDATA" | "NDEATH" | "DDEATH" => {}
        "NCMD" | "DCMD" if cfg.commands => {}
        "NCMD" | "DCMD" => return Ok(()),
        other => return Err(format!("message type {:?} is not a Sparkplug B payload this plugin decodes", other)),
    }
    let device: Option<String> = match (&t, cfg.device) {
        (None, _) | (_, DeviceFrom::Message) => None,
        (Some(t), DeviceFrom::Edge) => Some(match t.device {
            Some(d) => format!("{}/{}", t.node, d),
            None => t.node.to_string(),
        }),
        (Some(t), DeviceFrom::Full) => Some(match t.device {
            Some(d) => format!("{}/{}/{}", t.group, t.node, d),
            None => format!("{}/{}", t.group, t.node),
        }),
    };
    let node_key = t.as_ref().map_or(String::new(), |t| format!("{}/{}", t.group, t.node));
    let dev = device.as_deref();
    if kind == "NDEATH" || kind == "DDEATH" {
        if kind == "NDEATH" {
            cfg.nodes.remove(&node_key); // a new NBIRTH brings the aliases again
        }
        if cfg.online {
            out.measurement_ex("online", false, "", Quality::Good, dev, None);
        }
        return Ok(());
    }
    // Payload { uint64 timestamp = 1; repeated Metric metrics = 2; uint64 seq = 3; ... }
    let mut pb = Pb::new(m.payload);
    let mut payload_ts = None;
    let mut metrics: Vec<&[u8]> = Vec::new();
    while let Some((n, f)) = pb.next().map_err(|e| format!("not a Sparkplug B payload: {}", e))? {
        match (n, f) {
            (1, Field::Varint(v)) => payload_ts = Some(v),
            (2, Field::Bytes(b)) => metrics.push(b),
            _ => {}
        }
    }
    let birth = kind.ends_with("BIRTH");
    if kind == "NBIRTH" {
        cfg.nodes.remove(&node_key);
    }
    let remembered: usize = cfg.nodes.values().map(|n| n.aliases.len() + n.units.len()).sum();
    let node = cfg.nodes.entry(node_key).or_default();
    let mut room = MAX_REMEMBERED.saturating_sub(remembered);
    if birth && cfg.online {
        out.measurement_ex("online", true, "", Quality::Good, dev, payload_ts.map(|t| t as f64 / 1000.0));
    }
    for (k, raw) in metrics.iter().enumerate() {
        let mm = match metric(raw) {
            Ok(mm) => mm,
            Err(e) => {
                out.error(format_args!("metric {}: {}", k, e));
                continue;
            }
        };
        if birth && room > 0 {
            if let (Some(a), Some(nm)) = (mm.alias, mm.name) {
                let unit = mm.unit.unwrap_or("").to_string();
                node.aliases.insert(a, (nm.to_string(), unit));
                room -= 1;
            }
            if let (Some(nm), Some(u)) = (mm.name, mm.unit) {
                node.units.insert(nm.to_string(), u.to_string());
                room = room.saturating_sub(1);
            }
        }
        let alias_name;
        let (name, mut unit): (&str, &str) = match (mm.name, mm.alias) {
            (Some(nm), _) => (nm, mm.unit.or_else(|| node.units.get(nm).map(String::as_str)).unwrap_or("")),
            (None, Some(a)) => match node.aliases.get(&a) {
                Some((nm, u)) => (nm.as_str(), mm.unit.unwrap_or(u.as_str())),
                None if cfg.alias_error => {
                    out.error(format_args!(
                        "metric {}: alias {} has no name (no birth certificate seen for it since the plugin started)",
                        k, a
                    ));
                    continue;
                }
                None => {
                    alias_name = format!("alias_{}", a);
                    (alias_name.as_str(), mm.unit.unwrap_or(""))
                }
            },
            (None, None) => {
                out.error(format_args!("metric {}: neither a name nor an alias", k));
                continue;
            }
        };
        if mm.is_null {
            continue;
        }
        let v = match mm.value {
            Some(v) => v,
            None => continue,
        };
        let (value, type_unit) = match value_of(mm.datatype, v) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) => {
                out.error(format_args!("metric {} ({}): {}", k, name, e));
                continue;
            }
        };
        if unit.is_empty() {
            unit = type_unit;
        }
        let ts = mm.timestamp.or(payload_ts).map(|t| t as f64 / 1000.0);
        out.measurement_ex(name, value, unit, Quality::Good, dev, ts);
    }
    Ok(())
}

flux_plugin! { state: Config, init_json: init, process: process }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        let t = topic("spBv1.0/plant/DDATA/edge1/pump7").unwrap();
        assert_eq!((t.group, t.kind, t.node, t.device), ("plant", "DDATA", "edge1", Some("pump7")));
        assert!(topic("spBv1.0/plant/NDATA").is_none());
        assert!(topic("spAv1.0/a/NDATA/b").is_none());
        assert_eq!(f32_value(0.1), 0.1);
    }

    #[test]
    fn never_panics_on_noise() {
        let mut c = init(&Json::Object(Default::default())).unwrap();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0..20_000usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut f = vec![0x08, 0x01, 0x12, 0x0A, 0x0A, 0x01, b'a', 0x10, 0x01, 0x20, 0x09, 0x65, 0, 0];
            for k in 0..(n % 24) {
                f.push((seed >> (k % 56)) as u8);
            }
            let mut buf = Vec::new();
            let mut out = Output::new(&mut buf, 0);
            let topic = if n % 2 == 0 { "spBv1.0/g/NBIRTH/e" } else { "spBv1.0/g/DDATA/e/d" };
            let m = Message { index: 0, kind: 0, function: 0, address: 0, ts: 0.0, device: "d", topic, payload: &f };
            let _ = process(&mut c, &m, &mut out);
        }
    }
}
