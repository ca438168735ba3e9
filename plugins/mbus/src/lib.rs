//! mbus: wired M-Bus (EN 13757-2 link layer, EN 13757-3 application layer) -> measurements.
//! See README.md.
//!
//! Long frame: `68 L L 68 C A CI data CS 16`; L counts C, A, CI and the data, CS is the sum of
//! those bytes modulo 256. A variable data response (CI 0x72 with the 12-byte long header,
//! 0x7A with the 4-byte short header, 0x78 without) carries data records: DIF, DIFEs, VIF,
//! VIFEs, data. One measurement per record.

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_BYTES;

#[derive(Clone, Copy, PartialEq)]
enum DeviceFrom {
    Message,
    Secondary,
    Primary,
}

pub struct Config {
    kwh: bool,
    header: bool,
    device: DeviceFrom,
    names: Vec<(String, String)>,
}

fn init(cfg: &Json) -> Result<Config, String> {
    let obj = cfg.as_object().ok_or("the config must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "energy_unit" | "header" | "device" | "names" | "source") {
            return Err(format!("unknown key {:?} (keys: energy_unit, header, device, names)", key));
        }
    }
    let kwh = match obj.get("energy_unit").and_then(Json::as_str) {
        None if obj.get("energy_unit").map_or(true, Json::is_null) => false,
        Some("Wh") => false,
        Some("kWh") => true,
        _ => return Err(format!("energy_unit must be \"Wh\" or \"kWh\", got {}", obj["energy_unit"])),
    };
    let header = match obj.get("header") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(v) => return Err(format!("header must be true or false, got {}", v)),
    };
    let device = match obj.get("device").and_then(Json::as_str) {
        None if obj.get("device").map_or(true, Json::is_null) => DeviceFrom::Message,
        Some("message") => DeviceFrom::Message,
        Some("secondary") => DeviceFrom::Secondary,
        Some("primary") => DeviceFrom::Primary,
        _ => return Err(format!("device must be \"message\", \"secondary\" or \"primary\", got {}", obj["device"])),
    };
    let mut names = Vec::new();
    match obj.get("names") {
        None | Some(Json::Null) => {}
        Some(Json::Object(map)) => {
            for (from, to) in map {
                let to = to.as_str().filter(|s| !s.is_empty()).ok_or_else(|| format!("names.{}: the name must be a non-empty string", from))?;
                names.push((from.clone(), to.to_string()));
            }
        }
        Some(v) => return Err(format!("names must be a table of record name = new name, got {}", v)),
    }
    Ok(Config { kwh, header, device, names })
}

// --- values ------------------------------------------------------------------------------------

enum Raw<'a> {
    Int(i64),
    Real(f64),
    Text(String),
    Bytes(&'a [u8]),
}

fn le_signed(b: &[u8]) -> i64 {
    let mut v: i64 = if b.last().map_or(false, |&x| x & 0x80 != 0) { -1 } else { 0 };
    for &x in b.iter().rev() {
        v = (v << 8) | x as i64;
    }
    v
}

fn le_unsigned(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64)
}

/// BCD, least significant byte first. A most significant nibble F marks a negative number
/// (EN 13757-3 allows it, several meters use it); any other nibble above 9 is an error.
fn bcd(b: &[u8]) -> Result<i64, String> {
    let mut v: i64 = 0;
    let mut negative = false;
    for (k, &x) in b.iter().enumerate().rev() {
        for (j, d) in [(x >> 4) & 15, x & 15].into_iter().enumerate() {
            if d > 9 {
                if k == b.len() - 1 && j == 0 && d == 15 {
                    negative = true;
                    continue;
                }
                let mut hex = String::new();
                for y in b.iter().rev() {
                    hex.push_str(&format!("{:02X}", y));
                }
                return Err(format!("BCD value {} has a digit {:X}", hex, d));
            }
            v = v * 10 + d as i64;
        }
    }
    Ok(if negative { -v } else { v })
}

const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

fn scaled(raw: f64, exp: i32) -> f64 {
    let k = exp.unsigned_abs() as usize;
    let p = if k < POW10.len() { POW10[k] } else { 10f64.powi(k as i32) };
    if exp < 0 {
        raw / p
    } else {
        raw * p
    }
}

// --- VIF tables (EN 13757-3) ------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Form {
    /// a number * 10^exp in unit
    Num,
    /// a date (type G) or date and time (types F, I)
    Time,
    /// an identifier, version, code: the integer as is
    Plain,
    /// manufacturer-specific: raw bytes in hex
    Hex,
}

struct Vif {
    name: &'static str,
    unit: &'static str,
    exp: i32,
    form: Form,
}

const fn num(name: &'static str, unit: &'static str, exp: i32) -> Vif {
    Vif { name, unit, exp, form: Form::Num }
}

const fn plain(name: &'static str) -> Vif {
    Vif { name, unit: "", exp: 0, form: Form::Plain }
}

const DURATION: [&str; 4] = ["s", "min", "h", "d"];

/// The primary VIF table (bit 7, the extension bit, already cleared).
fn primary(v: u8) -> Option<Vif> {
    let n = (v & 7) as i32;
    let nn = (v & 3) as i32;
    Some(match v {
        0x00..=0x07 => num("energy", "Wh", n - 3),
        0x08..=0x0F => num("energy", "J", n),
        0x10..=0x17 => num("volume", "m³", n - 6),
        0x18..=0x1F => num("mass", "kg", n - 3),
        0x20..=0x23 => num("on_time", DURATION[nn as usize], 0),
        0x24..=0x27 => num("operating_time", DURATION[nn as usize], 0),
        0x28..=0x2F => num("power", "W", n - 3),
        0x30..=0x37 => num("power", "J/h", n),
        0x38..=0x3F => num("volume_flow", "m³/h", n - 6),
        0x40..=0x47 => num("volume_flow", "m³/min", n - 7),
        0x48..=0x4F => num("volume_flow", "m³/s", n - 9),
        0x50..=0x57 => num("mass_flow", "kg/h", n - 3),
        0x58..=0x5B => num("flow_temperature", "°C", nn - 3),
        0x5C..=0x5F => num("return_temperature", "°C", nn - 3),
        0x60..=0x63 => num("temperature_difference", "K", nn - 3),
        0x64..=0x67 => num("external_temperature", "°C", nn - 3),
        0x68..=0x6B => num("pressure", "bar", nn - 3),
        0x6C | 0x6D => Vif { name: "time_point", unit: "", exp: 0, form: Form::Time },
        0x6E => plain("hca_units"),
        0x70..=0x73 => num("averaging_duration", DURATION[nn as usize], 0),
        0x74..=0x77 => num("actuality_duration", DURATION[nn as usize], 0),
        0x78 => plain("fabrication_number"),
        0x79 => plain("enhanced_identification"),
        0x7A => plain("bus_address"),
        _ => return None,
    })
}

/// The first extension table, after VIF 0xFB.
fn table_fb(v: u8) -> Option<Vif> {
    let n = (v & 1) as i32;
    let nn = (v & 3) as i32;
    Some(match v {
        0x00 | 0x01 => num("energy", "Wh", n + 5),
        0x08 | 0x09 => num("energy", "J", n + 8),
        0x10 | 0x11 => num("volume", "m³", n + 2),
        0x18 | 0x19 => num("mass", "kg", n + 5),
        0x28 | 0x29 => num("power", "W", n + 5),
        0x30 | 0x31 => num("power", "J/h", n + 8),
        0x58..=0x5B => num("flow_temperature", "°F", nn - 3),
        0x5C..=0x5F => num("return_temperature", "°F", nn - 3),
        0x60..=0x63 => num("temperature_difference", "°F", nn - 3),
        0x64..=0x67 => num("external_temperature", "°F", nn - 3),
        _ => return None,
    })
}

/// The second extension table, after VIF 0xFD.
fn table_fd(v: u8) -> Option<Vif> {
    let nn = (v & 3) as i32;
    let n4 = (v & 15) as i32;
    Some(match v {
        0x00..=0x03 => num("credit", "", nn - 3),
        0x04..=0x07 => num("debit", "", nn - 3),
        0x08 => plain("access_number"),
        0x09 => plain("medium"),
        0x0A => plain("manufacturer"),
        0x0B => plain("parameter_set"),
        0x0C => plain("model_version"),
        0x0D => plain("hardware_version"),
        0x0E => plain("firmware_version"),
        0x0F => plain("software_version"),
        0x17 => plain("error_flags"),
        0x1A => plain("digital_output"),
        0x1B => plain("digital_input"),
        0x40..=0x4F => num("voltage", "V", n4 - 9),
        0x50..=0x5F => num("current", "A", n4 - 12),
        0x60 => plain("reset_counter"),
        0x61 => plain("cumulation_counter"),
        _ => return None,
    })
}

// --- records -----------------------------------------------------------------------------------

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 * b.len());
    for x in b {
        s.push_str(&format!("{:02x}", x));
    }
    s
}

/// Types G (date), F (date and time to the minute) and I (to the second), EN 13757-3 Annex A.
fn time_point(b: &[u8]) -> Result<String, String> {
    let ymd = |lo: u8, hi: u8| -> (u32, u32, u32) {
        let year = (((lo & 0xE0) >> 5) | ((hi & 0xF0) >> 1)) as u32;
        (2000 + year, (hi & 0x0F) as u32, (lo & 0x1F) as u32)
    };
    match b.len() {
        2 => {
            let (y, m, d) = ymd(b[0], b[1]);
            Ok(format!("{:04}-{:02}-{:02}", y, m, d))
        }
        4 => {
            if b[0] & 0x80 != 0 {
                return Err("time point is flagged invalid".to_string());
            }
            let (y, m, d) = ymd(b[2], b[3]);
            Ok(format!("{:04}-{:02}-{:02}T{:02}:{:02}", y, m, d, b[1] & 0x1F, b[0] & 0x3F))
        }
        6 => {
            if b[1] & 0x80 != 0 {
                return Err("time point is flagged invalid".to_string());
            }
            let (y, m, d) = ymd(b[3], b[4]);
            Ok(format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", y, m, d, b[2] & 0x1F, b[1] & 0x3F, b[0] & 0x3F))
        }
        n => Err(format!("a time point of {} bytes", n)),
    }
}

struct Records<'a> {
    d: &'a [u8],
    p: usize,
}

impl<'a> Records<'a> {
    fn byte(&mut self, what: &str) -> Result<u8, String> {
        let b = *self.d.get(self.p).ok_or_else(|| format!("the data ends inside a record ({} at byte {})", what, self.p))?;
        self.p += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .d
            .get(self.p..self.p + n)
            .ok_or_else(|| format!("a record's data of {} bytes runs past the end of the frame (byte {})", n, self.p))?;
        self.p += n;
        Ok(s)
    }
}

/// Decodes the records of a variable data block; names go through `used` to stay unique.
fn records(cfg: &Config, data: &[u8], device: Option<&str>, out: &mut Output) {
    let mut r = Records { d: data, p: 0 };
    let mut used: Vec<String> = Vec::new();
    let mut index = 0usize;
    while r.p < data.len() {
        let at = r.p;
        match record(cfg, &mut r) {
            Ok(Step::Skip) => {}
            Ok(Step::End) => break,
            Ok(Step::Value { mut name, value, unit }) => {
                if let Some((_, to)) = cfg.names.iter().find(|(from, _)| *from == name) {
                    name = to.clone();
                }
                if used.contains(&name) {
                    name = format!("{}_{}", name, index);
                }
                match &value {
                    Raw::Int(v) => out.measurement_ex(&name, *v, unit, Quality::Good, device, None),
                    Raw::Real(v) => out.measurement_ex(&name, *v, unit, Quality::Good, device, None),
                    Raw::Text(s) => out.measurement_ex(&name, s.as_str(), unit, Quality::Good, device, None),
                    Raw::Bytes(b) => out.measurement_ex(&name, hex(b).as_str(), unit, Quality::Good, device, None),
                }
                used.push(name);
            }
            Ok(Step::Bad(e)) => out.error(format_args!("record {} at byte {} of the data: {}", index, at, e)),
            Err(e) => {
                out.error(format_args!("record {} at byte {} of the data: {}; the rest of the frame is skipped", index, at, e));
                break;
            }
        }
        index += 1;
    }
}

enum Step<'a> {
    Skip,
    End,
    Value { name: String, value: Raw<'a>, unit: &'static str },
    /// this record cannot be decoded, the next one can
    Bad(String),
}

fn record<'a>(cfg: &Config, r: &mut Records<'a>) -> Result<Step<'a>, String> {
    let dif = r.byte("DIF")?;
    match dif {
        0x2F => return Ok(Step::Skip), // idle filler
        0x0F | 0x1F => return Ok(Step::End), // manufacturer-specific data (0x1F: more records follow)
        _ => {}
    }
    if dif & 0x0F == 0x0F {
        return Err(format!("special function DIF 0x{:02X}", dif));
    }
    let function = (dif >> 4) & 3;
    let mut storage = ((dif >> 6) & 1) as u64;
    let mut tariff = 0u64;
    let mut subunit = 0u64;
    let mut ext = dif & 0x80 != 0;
    let mut k = 0;
    while ext {
        let dife = r.byte("DIFE")?;
        if k >= 10 {
            return Err("more than 10 DIFEs".to_string());
        }
        storage |= ((dife & 0x0F) as u64) << (1 + 4 * k);
        tariff |= (((dife >> 4) & 3) as u64) << (2 * k);
        subunit |= (((dife >> 6) & 1) as u64) << k;
        ext = dife & 0x80 != 0;
        k += 1;
    }
    let vif = r.byte("VIF")?;
    let mut plain_text = String::new();
    let mut info: Option<Vif> = None;
    let mut last = vif;
    let mut unknown = false;
    match vif & 0x7F {
        0x7B | 0x7D if vif & 0x80 != 0 => {
            let code = r.byte("VIFE")?;
            last = code;
            info = if vif & 0x7F == 0x7B { table_fb(code & 0x7F) } else { table_fd(code & 0x7F) };
            unknown = info.is_none();
            if unknown {
                plain_text = format!("vif_{:02x}_{:02x}", vif, code);
            }
        }
        0x7C => {} // the unit's text follows the VIFEs
        0x7E => unknown = true,
        0x7F => info = Some(Vif { name: "manufacturer_specific", unit: "", exp: 0, form: Form::Hex }),
        v => {
            info = primary(v);
            unknown = info.is_none();
            if unknown {
                plain_text = format!("vif_{:02x}", vif);
            }
        }
    }
    // VIFEs: multiplicative correction factors are applied; the others do not change the value
    let mut correction = 0i32;
    while last & 0x80 != 0 {
        let vife = r.byte("VIFE")?;
        match vife & 0x7F {
            0x70..=0x77 => correction += (vife & 7) as i32 - 6,
            0x7D => correction += 3,
            _ => {}
        }
        last = vife;
    }
    if vif & 0x7F == 0x7C {
        let n = r.byte("plain-text VIF length")? as usize;
        let text = r.take(n)?;
        plain_text = text.iter().rev().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '?' }).collect();
    }
    // the data
    let len = match dif & 0x0F {
        0 | 8 => 0,
        1 | 9 => 1,
        2 | 0xA => 2,
        3 | 0xB => 3,
        4 | 5 | 0xC => 4,
        6 | 0xE => 6,
        7 => 8,
        _ => usize::MAX, // 0x0D: variable length
    };
    let mut fixed: &'a [u8] = &[];
    let raw: Raw<'a> = if len == usize::MAX {
        let lvar = r.byte("LVAR")?;
        match lvar {
            0x00..=0xBF => {
                let b = r.take(lvar as usize)?;
                Raw::Text(b.iter().rev().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '?' }).collect())
            }
            0xC0..=0xCF | 0xD0..=0xDF => {
                let b = r.take((lvar & 0x0F) as usize)?;
                match bcd(b) {
                    Ok(v) => Raw::Int(if lvar >= 0xD0 { -v } else { v }),
                    Err(e) => return Ok(Step::Bad(e)),
                }
            }
            0xE0..=0xEF => {
                let b = r.take((lvar & 0x0F) as usize)?;
                if b.len() > 8 {
                    Raw::Bytes(b)
                } else {
                    Raw::Int(le_signed(b))
                }
            }
            _ => return Err(format!("variable-length data with LVAR 0x{:02X}", lvar)),
        }
    } else {
        if len == 0 {
            return Ok(Step::Skip);
        }
        let b = r.take(len)?;
        fixed = b;
        match dif & 0x0F {
            5 => Raw::Real(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            9..=0x0E => match bcd(b) {
                Ok(v) => Raw::Int(v),
                Err(e) => return Ok(Step::Bad(e)),
            },
            _ => Raw::Int(le_signed(b)),
        }
    };
    if unknown && vif & 0x7F == 0x7E {
        return Ok(Step::Skip);
    }
    let (base, mut unit, mut exp, form) = match &info {
        Some(v) => (v.name.to_string(), v.unit, v.exp + correction, v.form),
        None if vif & 0x7F == 0x7C => {
            let n: String = plain_text.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
            (format!("value_{}", n), "", correction, Form::Num)
        }
        None => (plain_text.clone(), "", correction, Form::Plain),
    };
    let mut name = base;
    match function {
        1 => name.push_str("_max"),
        2 => name.push_str("_min"),
        3 => name.push_str("_error"),
        _ => {}
    }
    if storage > 0 {
        name.push_str(&format!("_s{}", storage));
    }
    if tariff > 0 {
        name.push_str(&format!("_t{}", tariff));
    }
    if subunit > 0 {
        name.push_str(&format!("_u{}", subunit));
    }
    if cfg.kwh && unit == "Wh" {
        unit = "kWh";
        exp -= 3;
    }
    let value = match (form, raw) {
        (Form::Time, Raw::Int(_)) if !fixed.is_empty() => {
            match time_point(fixed) {
                Ok(t) => Raw::Text(t),
                Err(e) => return Ok(Step::Bad(e)),
            }
        }
        (Form::Hex, Raw::Int(_)) if !fixed.is_empty() => Raw::Bytes(fixed),
        (Form::Num, Raw::Int(v)) if !unit.is_empty() || exp != 0 || vif & 0x7F == 0x7C => Raw::Real(scaled(v as f64, exp)),
        (Form::Num, Raw::Real(v)) => Raw::Real(scaled(v, exp)),
        (Form::Plain, Raw::Int(v)) if matches!(dif & 0x0F, 1..=4 | 6) => {
            // identifiers and codes are unsigned
            let _ = v;
            Raw::Int(le_unsigned(fixed) as i64)
        }
        (_, raw) => raw,
    };
    if let Raw::Real(v) = value {
        if !v.is_finite() {
            return Ok(Step::Bad(format!("{}: the value is not a finite number", name)));
        }
    }
    let unit = if vif & 0x7F == 0x7C { leak_unit(&plain_text) } else { unit };
    Ok(Step::Value { name, value, unit })
}

/// A plain-text unit is rare: keep a few distinct ones for the life of the instance.
fn leak_unit(text: &str) -> &'static str {
    static mut UNITS: Vec<&'static str> = Vec::new();
    // SAFETY: wasm32 guests are single-threaded.
    let units = unsafe { &mut *core::ptr::addr_of_mut!(UNITS) };
    if let Some(u) = units.iter().find(|u| **u == text) {
        return u;
    }
    if units.len() >= 32 {
        return "";
    }
    let u: &'static str = Box::leak(text.to_string().into_boxed_str());
    units.push(u);
    u
}

fn manufacturer(code: u16) -> String {
    [(code >> 10) & 0x1F, (code >> 5) & 0x1F, code & 0x1F].iter().map(|&c| (c as u8 + 64) as char).collect()
}

// --- frames ------------------------------------------------------------------------------------

fn frame(cfg: &Config, b: &[u8], start: usize, out: &mut Output) -> usize {
    let l = b[start + 1] as usize;
    let end = start + l + 6;
    if b[start + 2] as usize != l || b[start + 3] != 0x68 {
        out.error(format_args!("frame at byte {}: a long frame starts 68 L L 68, got {}", start, hex(&b[start..(start + 4).min(b.len())])));
        return start + 1;
    }
    if end > b.len() {
        out.error(format_args!(
            "incomplete frame at byte {}: L = {} needs {} bytes, the burst has {} (set idle longer, or raise max_frame)",
            start,
            l,
            l + 6,
            b.len() - start
        ));
        return b.len();
    }
    let body = &b[start + 4..start + 4 + l];
    let cs = body.iter().fold(0u8, |a, &c| a.wrapping_add(c));
    if cs != b[end - 2] {
        out.error(format_args!(
            "checksum mismatch in the frame at byte {}: got 0x{:02X}, its bytes sum to 0x{:02X} (a lost or damaged byte)",
            start,
            b[end - 2],
            cs
        ));
        return end;
    }
    if b[end - 1] != 0x16 {
        out.error(format_args!("frame at byte {}: no stop byte 0x16 after the checksum (got 0x{:02X})", start, b[end - 1]));
        return end;
    }
    if l < 3 {
        return end;
    }
    let (c, a, ci) = (body[0], body[1], body[2]);
    if l == 3 {
        return end; // a control frame
    }
    if c & 0xCF != 0x08 {
        out.error(format_args!("frame at byte {}: C field 0x{:02X} is not a response RSP_UD (0x08)", start, c));
        return end;
    }
    let rest = &body[3..];
    let (header, data): (&[u8], &[u8]) = match ci {
        0x72 if rest.len() >= 12 => (&rest[..12], &rest[12..]),
        0x7A if rest.len() >= 4 => (&rest[..4], &rest[4..]),
        0x78 => (&[], rest),
        0x72 | 0x7A => {
            out.error(format_args!("frame at byte {}: CI 0x{:02X} with a header cut short", start, ci));
            return end;
        }
        _ => {
            out.error(format_args!(
                "frame at byte {}: CI 0x{:02X} is not a variable data response (0x72, 0x7A or 0x78)",
                start, ci
            ));
            return end;
        }
    };
    let mut secondary = None;
    if header.len() == 12 {
        let id = bcd(&header[..4]).map(|v| format!("{:08}", v)).unwrap_or_else(|_| hex(&header[..4]));
        let man = manufacturer(u16::from_le_bytes([header[4], header[5]]));
        secondary = Some(format!("{}-{}", man, id));
        if cfg.header {
            let dev = device_for(cfg, a, secondary.as_deref());
            let dev = dev.as_deref();
            out.measurement_ex("id", id.as_str(), "", Quality::Good, dev, None);
            out.measurement_ex("manufacturer", man.as_str(), "", Quality::Good, dev, None);
            out.measurement_ex("version", header[6] as i64, "", Quality::Good, dev, None);
            out.measurement_ex("medium", header[7] as i64, "", Quality::Good, dev, None);
        }
    }
    let dev = device_for(cfg, a, secondary.as_deref());
    if cfg.header && !header.is_empty() {
        let off = if header.len() == 12 { 8 } else { 0 };
        out.measurement_ex("access_number", header[off] as i64, "", Quality::Good, dev.as_deref(), None);
        out.measurement_ex("status", header[off + 1] as i64, "", Quality::Good, dev.as_deref(), None);
    }
    records(cfg, data, dev.as_deref(), out);
    end
}

fn device_for(cfg: &Config, primary: u8, secondary: Option<&str>) -> Option<String> {
    match cfg.device {
        DeviceFrom::Message => None,
        DeviceFrom::Secondary => secondary.map(str::to_string),
        DeviceFrom::Primary => Some(format!("mbus{}", primary)),
    }
}

fn process(cfg: &mut Config, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_BYTES {
        return Err(format!("expected bytes (kind 0), got kind {} ({})", m.kind, m.kind_name()));
    }
    let b = m.payload;
    let mut p = 0;
    while p < b.len() {
        match b[p] {
            0xE5 => p += 1, // single-character acknowledgement
            0x10 if p + 5 <= b.len() && b[p + 4] == 0x16 => p += 5, // a short frame (a request's echo)
            0x68 if p + 4 <= b.len() => p = frame(cfg, b, p, out),
            _ => {
                let next = b[p + 1..].iter().position(|&c| c == 0x68).map_or(b.len(), |i| p + 1 + i);
                out.error(format_args!(
                    "skipped {} bytes at byte {} outside a frame (a lost frame start, or noise)",
                    next - p,
                    p
                ));
                p = next;
            }
        }
    }
    Ok(())
}

flux_plugin! { state: Config, init_json: init, process: process }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcd_and_manufacturer() {
        assert_eq!(bcd(&[0x78, 0x56, 0x34, 0x12]), Ok(12345678));
        assert_eq!(bcd(&[0x34, 0xF2]), Ok(-234));
        assert!(bcd(&[0x1A]).is_err());
        assert_eq!(manufacturer(0x4024), "PAD");
        assert_eq!(le_signed(&[0xFF, 0xFF, 0xFF]), -1);
    }

    #[test]
    fn never_panics_on_noise() {
        let mut c = init(&Json::Object(Default::default())).unwrap();
        let base: [u8; 37] = [
            0x68, 0x1F, 0x1F, 0x68, 0x08, 0x02, 0x72, 0x78, 0x56, 0x34, 0x12, 0x24, 0x40, 0x01, 0x07, 0x55, 0x00, 0x00, 0x00,
            0x03, 0x13, 0x15, 0x31, 0x00, 0xDA, 0x02, 0x3B, 0x13, 0x01, 0x8B, 0x60, 0x04, 0x37, 0x18, 0x02, 0x18, 0x16,
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0..20_000usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut f = base.to_vec();
            let at = 19 + (seed as usize) % 16;
            f[at] = (seed >> 32) as u8;
            let cs = f[4..35].iter().fold(0u8, |a, &x| a.wrapping_add(x));
            f[35] = cs; // keep the checksum right: the record parser sees the damage
            f.truncate(f.len() - (n % 3));
            let mut buf = Vec::new();
            let mut out = Output::new(&mut buf, 0);
            let m = Message { index: 0, kind: 0, function: 0, address: 0, ts: 0.0, device: "d", topic: "", payload: &f };
            let _ = process(&mut c, &m, &mut out);
        }
    }
}
