//! sunspec: SunSpec Modbus model blocks -> measurements. See README.md.
//!
//! Input: kind-1 messages from a Modbus source with `discover = "sunspec"`: one message per
//! model, `topic` = "sunspec/<model id>", the registers = the model's block after its header
//! (ID and L), `address` = the block's first register. Point layouts, types, scale factors and
//! units follow the SunSpec model definitions (sunspec/models, json/model_<id>.json).

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_REGISTERS;

// --- the model definitions ---------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum T {
    I16,
    U16,
    Acc32,
    #[allow(dead_code)] // no model decoded here has one; the decoder knows the type
    U32,
    #[allow(dead_code)]
    I32,
    Enum16,
    Bits32,
    Sf,
    Pad,
    Str(u8), // registers
}

impl T {
    fn size(self) -> usize {
        match self {
            T::Acc32 | T::U32 | T::I32 | T::Bits32 => 2,
            T::Str(n) => n as usize,
            _ => 1,
        }
    }
}

/// One point of a definition, in order: name, type, scale factor point ("" = none), units.
type Def = (&'static str, T, &'static str, &'static str);

const COMMON: &[Def] = &[
    ("Mn", T::Str(16), "", ""),
    ("Md", T::Str(16), "", ""),
    ("Opt", T::Str(8), "", ""),
    ("Vr", T::Str(8), "", ""),
    ("SN", T::Str(16), "", ""),
    ("DA", T::U16, "", ""),
    ("Pad", T::Pad, "", ""),
];

// Models 101 (single phase), 102 (split phase) and 103 (three phase) share this layout; the
// phases a model does not have hold the 'not implemented' value.
const INVERTER: &[Def] = &[
    ("A", T::U16, "A_SF", "A"),
    ("AphA", T::U16, "A_SF", "A"),
    ("AphB", T::U16, "A_SF", "A"),
    ("AphC", T::U16, "A_SF", "A"),
    ("A_SF", T::Sf, "", ""),
    ("PPVphAB", T::U16, "V_SF", "V"),
    ("PPVphBC", T::U16, "V_SF", "V"),
    ("PPVphCA", T::U16, "V_SF", "V"),
    ("PhVphA", T::U16, "V_SF", "V"),
    ("PhVphB", T::U16, "V_SF", "V"),
    ("PhVphC", T::U16, "V_SF", "V"),
    ("V_SF", T::Sf, "", ""),
    ("W", T::I16, "W_SF", "W"),
    ("W_SF", T::Sf, "", ""),
    ("Hz", T::U16, "Hz_SF", "Hz"),
    ("Hz_SF", T::Sf, "", ""),
    ("VA", T::I16, "VA_SF", "VA"),
    ("VA_SF", T::Sf, "", ""),
    ("VAr", T::I16, "VAr_SF", "var"),
    ("VAr_SF", T::Sf, "", ""),
    ("PF", T::I16, "PF_SF", "Pct"),
    ("PF_SF", T::Sf, "", ""),
    ("WH", T::Acc32, "WH_SF", "Wh"),
    ("WH_SF", T::Sf, "", ""),
    ("DCA", T::U16, "DCA_SF", "A"),
    ("DCA_SF", T::Sf, "", ""),
    ("DCV", T::U16, "DCV_SF", "V"),
    ("DCV_SF", T::Sf, "", ""),
    ("DCW", T::I16, "DCW_SF", "W"),
    ("DCW_SF", T::Sf, "", ""),
    ("TmpCab", T::I16, "Tmp_SF", "C"),
    ("TmpSnk", T::I16, "Tmp_SF", "C"),
    ("TmpTrns", T::I16, "Tmp_SF", "C"),
    ("TmpOt", T::I16, "Tmp_SF", "C"),
    ("Tmp_SF", T::Sf, "", ""),
    ("St", T::Enum16, "", ""),
    ("StVnd", T::Enum16, "", ""),
    ("Evt1", T::Bits32, "", ""),
    ("Evt2", T::Bits32, "", ""),
    ("EvtVnd1", T::Bits32, "", ""),
    ("EvtVnd2", T::Bits32, "", ""),
    ("EvtVnd3", T::Bits32, "", ""),
    ("EvtVnd4", T::Bits32, "", ""),
];

// Models 201 (single phase), 202 (split phase), 203 (wye) and 204 (delta) share this layout.
const METER: &[Def] = &[
    ("A", T::I16, "A_SF", "A"),
    ("AphA", T::I16, "A_SF", "A"),
    ("AphB", T::I16, "A_SF", "A"),
    ("AphC", T::I16, "A_SF", "A"),
    ("A_SF", T::Sf, "", ""),
    ("PhV", T::I16, "V_SF", "V"),
    ("PhVphA", T::I16, "V_SF", "V"),
    ("PhVphB", T::I16, "V_SF", "V"),
    ("PhVphC", T::I16, "V_SF", "V"),
    ("PPV", T::I16, "V_SF", "V"),
    ("PhVphAB", T::I16, "V_SF", "V"),
    ("PhVphBC", T::I16, "V_SF", "V"),
    ("PhVphCA", T::I16, "V_SF", "V"),
    ("V_SF", T::Sf, "", ""),
    ("Hz", T::I16, "Hz_SF", "Hz"),
    ("Hz_SF", T::Sf, "", ""),
    ("W", T::I16, "W_SF", "W"),
    ("WphA", T::I16, "W_SF", "W"),
    ("WphB", T::I16, "W_SF", "W"),
    ("WphC", T::I16, "W_SF", "W"),
    ("W_SF", T::Sf, "", ""),
    ("VA", T::I16, "VA_SF", "VA"),
    ("VAphA", T::I16, "VA_SF", "VA"),
    ("VAphB", T::I16, "VA_SF", "VA"),
    ("VAphC", T::I16, "VA_SF", "VA"),
    ("VA_SF", T::Sf, "", ""),
    ("VAR", T::I16, "VAR_SF", "var"),
    ("VARphA", T::I16, "VAR_SF", "var"),
    ("VARphB", T::I16, "VAR_SF", "var"),
    ("VARphC", T::I16, "VAR_SF", "var"),
    ("VAR_SF", T::Sf, "", ""),
    ("PF", T::I16, "PF_SF", "Pct"),
    ("PFphA", T::I16, "PF_SF", "Pct"),
    ("PFphB", T::I16, "PF_SF", "Pct"),
    ("PFphC", T::I16, "PF_SF", "Pct"),
    ("PF_SF", T::Sf, "", ""),
    ("TotWhExp", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWhExpPhA", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWhExpPhB", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWhExpPhC", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWhImp", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWhImpPhA", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWhImpPhB", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWhImpPhC", T::Acc32, "TotWh_SF", "Wh"),
    ("TotWh_SF", T::Sf, "", ""),
    ("TotVAhExp", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAhExpPhA", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAhExpPhB", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAhExpPhC", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAhImp", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAhImpPhA", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAhImpPhB", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAhImpPhC", T::Acc32, "TotVAh_SF", "VAh"),
    ("TotVAh_SF", T::Sf, "", ""),
    ("TotVArhImpQ1", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhImpQ1PhA", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhImpQ1PhB", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhImpQ1PhC", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhImpQ2", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhImpQ2PhA", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhImpQ2PhB", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhImpQ2PhC", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ3", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ3PhA", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ3PhB", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ3PhC", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ4", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ4PhA", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ4PhB", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArhExpQ4PhC", T::Acc32, "TotVArh_SF", "varh"),
    ("TotVArh_SF", T::Sf, "", ""),
    ("Evt", T::Bits32, "", ""),
];

const MODELS: &[(u16, &[Def])] = &[
    (1, COMMON),
    (101, INVERTER),
    (102, INVERTER),
    (103, INVERTER),
    (201, METER),
    (202, METER),
    (203, METER),
    (204, METER),
];

/// Registers a definition takes; model 1 may leave out its last register (Pad): 65 or 66.
fn def_len(def: &[Def]) -> usize {
    def.iter().map(|d| d.1.size()).sum()
}

fn min_len(id: u16, def: &[Def]) -> usize {
    if id == 1 {
        def_len(def) - 1
    } else {
        def_len(def)
    }
}

// --- the config --------------------------------------------------------------------------------

/// A point as the decoder walks it: where it is, what it is, its scale factor's offset.
struct Point {
    key: Key,
    name: &'static str,
    off: usize,
    t: T,
    sf: Option<(usize, &'static str)>,
    sym: bool, // an inverter's St reported by its symbol (enums = "symbol")
}

/// The symbols of St (operating state) in the inverter models 101-103, values 1..8.
const ST_SYMBOLS: [&str; 8] =
    ["OFF", "SLEEPING", "STARTING", "MPPT", "THROTTLED", "SHUTTING_DOWN", "FAULT", "STANDBY"];

struct Model {
    id: u16,
    min: usize,
    points: Vec<Point>,
}

pub struct Config {
    models: Vec<Model>,
}

fn ids_of(v: &Json, key: &str) -> Result<Option<Vec<u16>>, String> {
    match v {
        Json::Null => Ok(None),
        Json::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let id = item.as_u64().filter(|id| MODELS.iter().any(|m| u64::from(m.0) == *id));
                match id {
                    Some(id) => out.push(id as u16),
                    None => {
                        return Err(format!(
                            "{}[{}]: a model this plugin decodes (1, 101, 102, 103, 201, 202, 203, 204), got {}",
                            key, i, item
                        ))
                    }
                }
            }
            Ok(Some(out))
        }
        other => Err(format!("{} must be a list of model ids, got {}", key, other)),
    }
}

fn init(cfg: &Json) -> Result<Config, String> {
    let obj = cfg.as_object().ok_or("the config must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "models" | "points" | "names" | "prefix" | "enums" | "source") {
            return Err(format!("unknown key {:?} (keys: models, points, names, prefix, enums)", key));
        }
    }
    let keep = ids_of(obj.get("models").unwrap_or(&Json::Null), "models")?;
    let points: Option<Vec<String>> = match obj.get("points") {
        None | Some(Json::Null) => None,
        Some(Json::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let name = item.as_str().ok_or_else(|| format!("points[{}] must be a point name, got {}", i, item))?;
                let known = MODELS.iter().any(|m| m.1.iter().any(|d| d.0 == name && d.1 != T::Pad && d.1 != T::Sf));
                if !known {
                    return Err(format!("points[{}]: no model this plugin decodes has a point {:?}", i, name));
                }
                out.push(name.to_string());
            }
            Some(out)
        }
        Some(v) => return Err(format!("points must be a list of point names, got {}", v)),
    };
    let by_model = match obj.get("names").and_then(Json::as_str) {
        None if obj.get("names").map_or(true, Json::is_null) => false,
        Some("point") => false,
        Some("model") => true,
        _ => return Err(format!("names must be \"point\" or \"model\", got {}", obj["names"])),
    };
    let symbols = match obj.get("enums").and_then(Json::as_str) {
        None if obj.get("enums").map_or(true, Json::is_null) => false,
        Some("number") => false,
        Some("symbol") => true,
        _ => return Err(format!("enums must be \"number\" or \"symbol\", got {}", obj["enums"])),
    };
    let prefix = match obj.get("prefix") {
        None | Some(Json::Null) => "",
        Some(Json::String(s)) => s.as_str(),
        Some(v) => return Err(format!("prefix must be a string, got {}", v)),
    };
    let mut models = Vec::new();
    for &(id, def) in MODELS {
        if keep.as_ref().map_or(false, |k| !k.contains(&id)) {
            continue;
        }
        let mut offsets = Vec::with_capacity(def.len());
        let mut off = 0;
        for d in def {
            offsets.push(off);
            off += d.1.size();
        }
        let mut pts = Vec::new();
        for (i, d) in def.iter().enumerate() {
            if d.1 == T::Pad || d.1 == T::Sf {
                continue;
            }
            if points.as_ref().map_or(false, |p| !p.iter().any(|x| x == d.0)) {
                continue;
            }
            let sf = if d.2.is_empty() {
                None
            } else {
                let j = def.iter().position(|x| x.0 == d.2).expect("scale factor in its model");
                Some((offsets[j], d.2))
            };
            let name = if by_model { format!("{}m{}_{}", prefix, id, d.0) } else { format!("{}{}", prefix, d.0) };
            let sym = symbols && d.0 == "St" && (101..=103).contains(&id);
            pts.push(Point { key: Key::new(&name, d.3), name: d.0, off: offsets[i], t: d.1, sf, sym });
        }
        models.push(Model { id, min: min_len(id, def), points: pts });
    }
    Ok(Config { models })
}

// --- decoding ----------------------------------------------------------------------------------

enum Raw {
    Int(i64),
    Text(String),
    None, // 'not implemented'
}

fn word(m: &Message, i: usize) -> u16 {
    m.register(i).unwrap_or(0)
}

fn raw(m: &Message, off: usize, t: T) -> Raw {
    let w = word(m, off);
    let d = || (u32::from(w) << 16) | u32::from(word(m, off + 1));
    match t {
        T::I16 | T::Sf => if w == 0x8000 { Raw::None } else { Raw::Int(i64::from(w as i16)) },
        T::U16 | T::Enum16 => if w == 0xFFFF { Raw::None } else { Raw::Int(i64::from(w)) },
        T::Acc32 => match d() { 0 => Raw::None, v => Raw::Int(i64::from(v)) },
        T::U32 | T::Bits32 => match d() { 0xFFFF_FFFF => Raw::None, v => Raw::Int(i64::from(v)) },
        T::I32 => match d() { 0x8000_0000 => Raw::None, v => Raw::Int(i64::from(v as i32)) },
        T::Str(n) => {
            let mut bytes = Vec::with_capacity(2 * n as usize);
            for i in 0..n as usize {
                let x = word(m, off + i);
                bytes.push((x >> 8) as u8);
                bytes.push(x as u8);
            }
            while matches!(bytes.last(), Some(0) | Some(b' ')) {
                bytes.pop();
            }
            if bytes.iter().all(|&b| b == 0) {
                Raw::None
            } else {
                Raw::Text(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
        T::Pad => Raw::None,
    }
}

const POW10: [f64; 11] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

fn scaled(v: i64, sf: i64) -> f64 {
    // a division by an exact power of ten rounds once: 2305 with -1 is 230.5, not 230.50000000000003
    if sf < 0 {
        v as f64 / POW10[(-sf) as usize]
    } else {
        v as f64 * POW10[sf as usize]
    }
}

fn model_id(topic: &str) -> Option<u16> {
    topic.strip_prefix("sunspec/")?.parse().ok()
}

fn process(cfg: &mut Config, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_REGISTERS {
        return Err(format!("expected a SunSpec model block (registers, kind 1), got kind {} ({})", m.kind, m.kind_name()));
    }
    let id = model_id(m.topic).ok_or_else(|| {
        format!(
            "not a SunSpec model block: topic {:?} (a Modbus device with discover = \"sunspec\" sends \"sunspec/<model id>\")",
            m.topic
        )
    })?;
    let model = match cfg.models.iter().find(|x| x.id == id) {
        Some(model) => model,
        None => return Ok(()), // a model this plugin does not decode, or not kept: nothing
    };
    let n = m.register_count();
    if n < model.min || m.payload.len() % 2 != 0 {
        return Err(format!(
            "model {} at {}: the block has {} register(s){}, its definition has {}",
            id,
            m.address,
            n,
            if m.payload.len() % 2 != 0 { " and an odd byte" } else { "" },
            model.min
        ));
    }
    let mut bad_sf: Option<(&str, i64)> = None;
    let mut skipped: Vec<&str> = Vec::new();
    for p in &model.points {
        if p.off + p.t.size() > n {
            continue; // model 1 without its Pad
        }
        match raw(m, p.off, p.t) {
            Raw::None => {}
            Raw::Text(s) => out.put(&p.key, &s),
            Raw::Int(v) => match p.sf {
                None if p.sym => match ST_SYMBOLS.get((v - 1) as usize) {
                    Some(symbol) if v >= 1 => out.put(&p.key, *symbol),
                    _ => out.put(&p.key, v.to_string().as_str()), // outside 1..8: the number, as text
                },
                None => out.put(&p.key, v),
                Some((at, sf_name)) => {
                    let sf = i64::from(word(m, at) as i16);
                    if (-10..=10).contains(&sf) {
                        out.put(&p.key, scaled(v, sf));
                    } else {
                        bad_sf.get_or_insert((sf_name, sf));
                        skipped.push(p.name);
                    }
                }
            },
        }
    }
    if let Some((sf_name, sf)) = bad_sf {
        let what = if sf == -32768 { "is not implemented (0x8000)".to_string() } else { format!("is {}, outside -10..10", sf) };
        out.error(format!(
            "model {} at {}: scale factor {} {}: {} not reported",
            id, m.address, sf_name, what, skipped.join(", ")
        ));
    }
    Ok(())
}

flux_plugin! { state: Config, init_json: init, process: process }

#[cfg(test)]
mod tests {
    use super::*;

    fn run(c: &mut Config, topic: &str, words: &[u16]) -> String {
        let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut buf = Vec::new();
        let mut out = Output::new(&mut buf, 0);
        let m = Message { index: 0, kind: 1, function: 3, address: 40070, ts: 1.0, device: "d", topic, payload: &payload };
        if let Err(e) = process(c, &m, &mut out) {
            out.error(e);
        }
        drop(out);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn lengths_match_the_definitions() {
        assert_eq!(def_len(COMMON), 66);
        assert_eq!(def_len(INVERTER), 50);
        assert_eq!(def_len(METER), 105);
    }

    #[test]
    fn scale_factors_and_not_implemented() {
        let mut c = init(&Json::Object(Default::default())).unwrap();
        let mut w = vec![0xFFFFu16; 50];
        w[0] = 123; // A
        w[4] = (-2i16) as u16; // A_SF
        w[12] = (-1000i16) as u16; // W
        w[13] = 1; // W_SF
        w[22] = 0; // WH, acc32 0: not implemented
        w[23] = 0;
        w[15] = 0x8000; // Hz_SF not implemented, with Hz 0xFFFF: skipped silently
        let text = run(&mut c, "sunspec/103", &w);
        assert!(text.contains("\"name\":\"A\",\"value\":1.23"), "{}", text);
        assert!(text.contains("\"name\":\"W\",\"value\":-10000.0"), "{}", text);
        assert!(!text.contains("\"WH\""), "{}", text);
        assert!(!text.contains("\"Hz\""), "{}", text);
        assert_eq!(scaled(2305, -1), 230.5);
    }

    #[test]
    fn st_by_symbol() {
        let cfg: Json = flux_plugin_sdk::serde_json::from_str(r#"{"enums": "symbol"}"#).unwrap();
        let mut c = init(&cfg).unwrap();
        let mut w = vec![0xFFFFu16; 50];
        w[36] = 4; // St: MPPT
        w[37] = 4; // StVnd: vendor-defined, stays a number
        let text = run(&mut c, "sunspec/103", &w);
        assert!(text.contains("\"name\":\"St\",\"value\":\"MPPT\""), "{}", text);
        assert!(text.contains("\"name\":\"StVnd\",\"value\":4"), "{}", text);
        w[36] = 9; // not in the definition
        let text = run(&mut c, "sunspec/103", &w);
        assert!(text.contains("\"name\":\"St\",\"value\":\"9\""), "{}", text);
        let bad: Json = flux_plugin_sdk::serde_json::from_str(r#"{"enums": "text"}"#).unwrap();
        assert!(init(&bad).is_err());
    }

    #[test]
    fn never_panics_on_noise() {
        let mut c = init(&Json::Object(Default::default())).unwrap();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let topics = ["sunspec/1", "sunspec/103", "sunspec/203", "sunspec/204", "sunspec/", "x", "sunspec/99999"];
        for n in 0..20_000usize {
            let mut w = Vec::new();
            for _ in 0..(n % 120) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                w.push((seed >> 16) as u16);
            }
            let _ = run(&mut c, topics[n % topics.len()], &w);
        }
    }
}
