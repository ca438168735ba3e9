//! modbus_decode: turns blocks of Modbus register words (kind 1) into named, scaled
//! measurements, using the register map of the source (`source.registers` in the init config,
//! or a top-level `registers` list). See README.md.

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::{Map, Value as Json};
use flux_plugin_sdk::{FN_COIL, FN_DISCRETE, FN_HOLDING, FN_INPUT, KIND_REGISTERS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Bool,
    Int16,
    Uint16,
    Int32,
    Uint32,
    Float32,
    Int64,
    Uint64,
    Float64,
    /// `count` registers of text, two bytes each.
    String,
}

const TYPES: &str = "bool|int16|uint16|int32|uint32|float32|int64|uint64|float64|string";

/// Most registers one read request returns (Modbus limit): the longest string a block can hold.
const MAX_STRING_REGISTERS: u64 = 125;

impl Type {
    fn parse(s: &str) -> Option<Type> {
        Some(match s {
            "bool" => Type::Bool,
            "int16" => Type::Int16,
            "uint16" => Type::Uint16,
            "int32" => Type::Int32,
            "uint32" => Type::Uint32,
            "float32" => Type::Float32,
            "int64" => Type::Int64,
            "uint64" => Type::Uint64,
            "float64" => Type::Float64,
            "string" => Type::String,
            _ => return None,
        })
    }
}

fn function_name(code: u8) -> Option<&'static str> {
    Some(match code {
        FN_COIL => "coil",
        FN_DISCRETE => "discrete",
        FN_HOLDING => "holding",
        FN_INPUT => "input",
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    /// name and unit, turned into JSON once for every output line
    key: Key,
    function: u8,
    address: u16,
    ty: Type,
    /// byte_order = "little": swap the two bytes of every word.
    swap_bytes: bool,
    /// word_order = "little": the word at the higher address is the most significant.
    low_word_first: bool,
    scale: f64,
    offset: f64,
    /// scale == 1 and offset == 0: int64/uint64 values are written as exact integers.
    exact: bool,
    /// registers of a string (0 for the other types)
    count: u16,
}

impl Register {
    /// Coils and discrete inputs are bools whatever `type` says (one word, 0 or 1, per bit).
    fn is_bool(&self) -> bool {
        self.ty == Type::Bool || self.function == FN_COIL || self.function == FN_DISCRETE
    }

    fn width(&self) -> u32 {
        match self.ty {
            _ if self.is_bool() => 1,
            Type::Int32 | Type::Uint32 | Type::Float32 => 2,
            Type::Int64 | Type::Uint64 | Type::Float64 => 4,
            Type::String => u32::from(self.count),
            _ => 1,
        }
    }
}

pub struct Decoder {
    registers: Vec<Register>,
}

fn get_str<'a>(obj: &'a Map<String, Json>, key: &str, default: &'a str) -> Result<&'a str, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(default),
        Some(Json::String(s)) => Ok(s),
        Some(other) => Err(format!("{} must be a string, got {}", key, other)),
    }
}

fn get_f64(obj: &Map<String, Json>, key: &str, default: f64) -> Result<f64, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(default),
        Some(Json::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{} must be a finite number, got {}", key, n)),
        Some(other) => Err(format!("{} must be a number, got {}", key, other)),
    }
}

fn get_order(obj: &Map<String, Json>, key: &str) -> Result<bool, String> {
    match get_str(obj, key, "big")? {
        "big" => Ok(false),
        "little" => Ok(true),
        other => Err(format!("{} must be \"big\" or \"little\", got {:?}", key, other)),
    }
}

fn parse_register(obj: &Map<String, Json>) -> Result<Register, String> {
    let name = get_str(obj, "name", "")?;
    if name.is_empty() {
        return Err("name is missing".to_string());
    }
    let address = match obj.get("address") {
        Some(Json::Number(n)) => match n.as_u64() {
            Some(a) if a <= 65535 => a as u16,
            _ => return Err(format!("address must be an integer 0..65535, got {}", n)),
        },
        None => return Err("address is missing".to_string()),
        Some(other) => return Err(format!("address must be an integer 0..65535, got {}", other)),
    };
    let function = match obj.get("function") {
        None | Some(Json::Null) => FN_HOLDING,
        Some(Json::String(s)) => match s.as_str() {
            "coil" => FN_COIL,
            "discrete" => FN_DISCRETE,
            "holding" => FN_HOLDING,
            "input" => FN_INPUT,
            _ => return Err(format!("function must be coil|discrete|holding|input, got {:?}", s)),
        },
        Some(Json::Number(n)) => match n.as_u64() {
            Some(c @ 1..=4) => c as u8,
            _ => return Err(format!("function code must be 1..4, got {}", n)),
        },
        Some(other) => return Err(format!("function must be coil|discrete|holding|input, got {}", other)),
    };
    let ty_name = get_str(obj, "type", "uint16")?;
    let ty = Type::parse(ty_name).ok_or_else(|| format!("type must be one of {}, got {:?}", TYPES, ty_name))?;
    let unit = get_str(obj, "unit", "")?;
    let bits = function == FN_COIL || function == FN_DISCRETE;
    let count = if ty == Type::String && !bits {
        let bad = || {
            format!(
                "a string needs count 1..{} (registers, 2 bytes each), got {}",
                MAX_STRING_REGISTERS,
                obj.get("count").map_or_else(|| "none".to_string(), Json::to_string)
            )
        };
        match obj.get("count").and_then(Json::as_u64) {
            Some(c @ 1..=MAX_STRING_REGISTERS) => c as u16,
            _ => return Err(bad()),
        }
    } else {
        0 // count means nothing for other types (the host passes 0)
    };
    let scale = get_f64(obj, "scale", 1.0)?;
    let offset = get_f64(obj, "offset", 0.0)?;
    let reg = Register {
        key: Key::new(name, unit),
        function,
        address,
        ty,
        swap_bytes: get_order(obj, "byte_order")?,
        low_word_first: get_order(obj, "word_order")?,
        scale,
        offset,
        exact: scale == 1.0 && offset == 0.0,
        count,
    };
    if u32::from(reg.address) + reg.width() > 65536 {
        return Err(format!("a {} at address {} runs past register 65535", ty_name, address));
    }
    Ok(reg)
}

fn init(cfg: &Json) -> Result<Decoder, String> {
    let top = cfg.get("registers");
    let from_source = cfg.get("source").and_then(|s| s.get("registers"));
    let (list, key) = match (top, from_source) {
        (Some(list), Some(_)) => {
            warn!("both registers and source.registers are set: using the top-level registers");
            (list, "registers")
        }
        (Some(list), None) => (list, "registers"),
        (None, Some(list)) => (list, "source.registers"),
        (None, None) => {
            return Err("no register map: expected source.registers (the Modbus source's map) \
                        or a top-level registers list in the plugin config"
                .to_string())
        }
    };
    let items = list.as_array().ok_or_else(|| format!("{} must be a list of register tables", key))?;
    if items.is_empty() {
        return Err(format!("{} is empty: nothing to decode", key));
    }
    let mut registers = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let result = match item.as_object() {
            Some(obj) => parse_register(obj),
            None => Err(format!("must be a table, got {}", item)),
        };
        match result {
            Ok(r) => registers.push(r),
            Err(e) => {
                let name = item.get("name").and_then(Json::as_str).unwrap_or("?");
                problems.push(format!("{}[{}] ({:?}): {}", key, i, name, e));
            }
        }
    }
    if !problems.is_empty() {
        return Err(format!("invalid register map: {}", problems.join("; ")));
    }
    debug!("decoding {} registers from {}", registers.len(), key);
    Ok(Decoder { registers })
}

fn process(d: &mut Decoder, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_REGISTERS {
        return Err(format!(
            "expected register words (kind 1), got kind {} ({}): put modbus_decode only on Modbus sources",
            m.kind,
            m.kind_name()
        ));
    }
    let fname = function_name(m.function).ok_or_else(|| format!("unknown Modbus function code {}", m.function))?;
    if m.payload.len() % 2 != 0 {
        return Err(format!("register payload has an odd length ({} bytes)", m.payload.len()));
    }
    let start = u32::from(m.address);
    let end = start + m.register_count() as u32; // exclusive
    let mut matched = 0usize;
    for r in d.registers.iter().filter(|r| r.function == m.function) {
        let first = u32::from(r.address);
        if first < start || first + r.width() > end {
            continue;
        }
        matched += 1;
        let i = (first - start) as usize;
        let word = |k: usize| {
            let w = m.register(i + k).unwrap_or(0);
            if r.swap_bytes {
                w.swap_bytes()
            } else {
                w
            }
        };
        if r.is_bool() {
            out.put(&r.key, word(0) != 0);
            continue;
        }
        let raw = match r.ty {
            Type::Int16 => f64::from(word(0) as i16),
            Type::Uint16 | Type::Bool => f64::from(word(0)),
            Type::Int32 | Type::Uint32 | Type::Float32 => {
                let (hi, lo) = if r.low_word_first { (word(1), word(0)) } else { (word(0), word(1)) };
                let bits = (u32::from(hi) << 16) | u32::from(lo);
                match r.ty {
                    Type::Int32 => f64::from(bits as i32),
                    Type::Uint32 => f64::from(bits),
                    _ => f64::from(f32::from_bits(bits)),
                }
            }
            Type::Int64 | Type::Uint64 | Type::Float64 => {
                let w = |k: usize| u64::from(word(if r.low_word_first { 3 - k } else { k }));
                let bits = (w(0) << 48) | (w(1) << 32) | (w(2) << 16) | w(3);
                match r.ty {
                    Type::Int64 if r.exact => {
                        out.put(&r.key, bits as i64);
                        continue;
                    }
                    Type::Int64 => bits as i64 as f64,
                    // above i64::MAX the SDK has no exact integer: a float it is
                    Type::Uint64 if r.exact && bits <= i64::MAX as u64 => {
                        out.put(&r.key, bits as i64);
                        continue;
                    }
                    Type::Uint64 => bits as f64,
                    _ => f64::from_bits(bits),
                }
            }
            Type::String => {
                let mut text = [0u8; 2 * MAX_STRING_REGISTERS as usize];
                let n = 2 * usize::from(r.count);
                for k in 0..usize::from(r.count) {
                    // a register holds its first character in its high byte (after byte_order)
                    text[2 * k..2 * k + 2].copy_from_slice(&word(k).to_be_bytes());
                }
                let used = text[..n].iter().rposition(|&b| b != 0 && b != b' ').map_or(0, |p| p + 1);
                let text = String::from_utf8_lossy(&text[..used]);
                out.put(&r.key, text.as_ref());
                continue;
            }
        };
        out.put(&r.key, raw * r.scale + r.offset);
    }
    if matched == 0 {
        let span = match end - start {
            0 => format!("registers at {} (empty block)", start),
            1 => format!("register {}", start),
            n => format!("registers {}-{} ({} words)", start, end - 1, n),
        };
        return Err(format!("no register of the map lies within {} {}", fname, span));
    }
    Ok(())
}

flux_plugin! { state: Decoder, init_json: init, process: process }
