//! sml: Smart Message Language (SML 1.04, BSI TR-03109-1) from German smart meters -> measurements.
//! See README.md.
//!
//! Transport (version 1): a frame starts with `1b1b1b1b 01010101` and ends with
//! `1b1b1b1b 1a PP CC CC`: PP padding bytes (0..3, zeros before the end sequence, so the frame
//! is a multiple of 4 bytes long) and the CRC-16/X.25 of every byte of the frame up to and
//! including PP, low byte first. `1b1b1b1b` inside the data is sent twice. Escape sequences sit
//! on 4-byte boundaries from the frame start, which the padding keeps true.
//!
//! Inside: a run of SML messages, each a list of 6 (transactionId, groupNo, abortOnError,
//! messageBody, crc16, endOfSmlMsg 0x00); crc16 is the X.25 CRC of the message's bytes from its
//! list tag to the crc field, read as a big-endian Unsigned16 of the low-byte-first CRC.
//! The measurements come from GetList.Res bodies (tag 0x0701): a list of SML_ListEntry
//! (objName = OBIS code, status, valTime, unit, scaler, value, valueSignature).

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_BYTES;

#[derive(Clone, Copy, PartialEq)]
enum Crc {
    /// frame and message CRCs
    Check,
    /// the frame CRC only
    Frame,
    /// none (a meter that computes them wrongly)
    Ignore,
}

#[derive(Clone, Copy, PartialEq)]
enum DeviceFrom {
    Message,
    ServerId,
}

pub struct Config {
    crc: Crc,
    strings: bool,
    kwh: bool,
    device: DeviceFrom,
    names: Vec<([u8; 6], String)>,
    /// the unescaped frame, kept between calls
    buf: Vec<u8>,
    /// output keys (name and unit, JSON-encoded once) by OBIS code and unit code
    keys: Vec<([u8; 6], u8, Key)>,
}

/// Keys kept at most: a meter sends a fixed list of a few dozen codes.
const MAX_KEYS: usize = 128;

fn parse_obis(text: &str) -> Option<[u8; 6]> {
    // A-B:C.D.E*F, A-B:C.D.E (F = 255), C.D.E (A = 1, B = 0, F = 255); '&' also separates F
    let (ab, rest) = match text.split_once(':') {
        Some((ab, rest)) => (Some(ab), rest),
        None => (None, text),
    };
    let (cde, f) = match rest.split_once(|c| c == '*' || c == '&') {
        Some((cde, f)) => (cde, f.parse::<u8>().ok()?),
        None => (rest, 255),
    };
    let (a, b) = match ab {
        Some(ab) => {
            let (a, b) = ab.split_once('-')?;
            (a.parse::<u8>().ok()?, b.parse::<u8>().ok()?)
        }
        None => (1, 0),
    };
    let mut it = cde.split('.');
    let c = it.next()?.parse::<u8>().ok()?;
    let d = it.next()?.parse::<u8>().ok()?;
    let e = it.next()?.parse::<u8>().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some([a, b, c, d, e, f])
}

fn init(cfg: &Json) -> Result<Config, String> {
    let obj = cfg.as_object().ok_or("the config must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "crc" | "strings" | "energy_unit" | "device" | "names" | "source") {
            return Err(format!("unknown key {:?} (keys: crc, strings, energy_unit, device, names)", key));
        }
    }
    let crc = match obj.get("crc").and_then(Json::as_str) {
        None if obj.get("crc").map_or(true, Json::is_null) => Crc::Check,
        Some("check") => Crc::Check,
        Some("frame") => Crc::Frame,
        Some("ignore") => Crc::Ignore,
        _ => return Err(format!("crc must be \"check\", \"frame\" or \"ignore\", got {}", obj["crc"])),
    };
    let strings = match obj.get("strings") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(v) => return Err(format!("strings must be true or false, got {}", v)),
    };
    let kwh = match obj.get("energy_unit").and_then(Json::as_str) {
        None if obj.get("energy_unit").map_or(true, Json::is_null) => false,
        Some("Wh") => false,
        Some("kWh") => true,
        _ => return Err(format!("energy_unit must be \"Wh\" or \"kWh\", got {}", obj["energy_unit"])),
    };
    let device = match obj.get("device").and_then(Json::as_str) {
        None if obj.get("device").map_or(true, Json::is_null) => DeviceFrom::Message,
        Some("message") => DeviceFrom::Message,
        Some("server_id") => DeviceFrom::ServerId,
        _ => return Err(format!("device must be \"message\" or \"server_id\", got {}", obj["device"])),
    };
    let mut names = Vec::new();
    match obj.get("names") {
        None | Some(Json::Null) => {}
        Some(Json::Object(map)) => {
            for (code, name) in map {
                let obis = parse_obis(code)
                    .ok_or_else(|| format!("names: {:?} is not an OBIS code (A-B:C.D.E, A-B:C.D.E*F or C.D.E)", code))?;
                let name = name.as_str().filter(|s| !s.is_empty()).ok_or_else(|| format!("names.{}: the name must be a non-empty string", code))?;
                names.push((obis, name.to_string()));
            }
        }
        Some(v) => return Err(format!("names must be a table of OBIS code = name, got {}", v)),
    }
    Ok(Config { crc, strings, kwh, device, names, buf: Vec::new(), keys: Vec::new() })
}

// --- CRC-16/X.25 (poly 0x1021 reflected, init and xorout 0xFFFF) ---------------------------------

/// Slice-by-8 tables: `T[0]` is the byte-at-a-time table; `T[k][i]` is the CRC contribution
/// of byte `i` followed by `k` more bytes, so eight bytes take eight lookups and no loop-carried
/// shift per byte (the frame and message CRCs were a third of the plugin's time).
const fn crc_tables() -> [[u16; 256]; 8] {
    let mut t = [[0u16; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u16;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x8408 } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static CRC_TABLES: [[u16; 256]; 8] = crc_tables();

pub fn crc16(data: &[u8]) -> u16 {
    let t = &CRC_TABLES;
    let mut crc = 0xFFFFu16;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let x = crc ^ u16::from_le_bytes([c[0], c[1]]);
        crc = t[7][(x & 0xFF) as usize]
            ^ t[6][(x >> 8) as usize]
            ^ t[5][c[2] as usize]
            ^ t[4][c[3] as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ b as u16) & 0xFF) as usize];
    }
    crc ^ 0xFFFF
}

// --- the SML type-length encoding ---------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum V<'a> {
    /// an optional field that is not set (0x01)
    Absent,
    Bytes(&'a [u8]),
    Bool(bool),
    Int(i64),
    UInt(u64),
    /// a list of n elements; the cursor is at its first element
    List(usize),
}

struct P<'a> {
    d: &'a [u8],
    p: usize,
}

const MAX_DEPTH: u32 = 12;

impl<'a> P<'a> {
    fn err(&self, at: usize, what: &str) -> String {
        format!("{} at byte {} of the message data", what, at)
    }

    /// One element. Octet strings, integers and booleans are read whole; a list is entered.
    fn value(&mut self) -> Result<V<'a>, String> {
        let at = self.p;
        let mut b = *self.d.get(self.p).ok_or_else(|| self.err(at, "data ends where an element was expected"))?;
        let ty = (b >> 4) & 7;
        let mut len = (b & 15) as usize;
        let mut n = 1;
        while b & 0x80 != 0 {
            b = *self.d.get(self.p + n).ok_or_else(|| self.err(at, "data ends inside a type-length field"))?;
            if b & 0x70 != 0 || n >= 4 {
                return Err(self.err(at, "malformed type-length field"));
            }
            len = (len << 4) | (b & 15) as usize;
            n += 1;
        }
        if b == 0 && n == 1 {
            return Err(self.err(at, "end of message (0x00) where an element was expected"));
        }
        if ty == 7 {
            self.p += n;
            return Ok(V::List(len));
        }
        if len < n {
            return Err(self.err(at, "an element shorter than its type-length field"));
        }
        let body = self.d.get(self.p + n..self.p + len).ok_or_else(|| self.err(at, "an element runs past the end of the data"))?;
        self.p += len;
        let k = body.len();
        match ty {
            0 if k == 0 => Ok(V::Absent),
            0 => Ok(V::Bytes(body)),
            4 if k == 1 => Ok(V::Bool(body[0] != 0)),
            5 if (1..=8).contains(&k) => {
                let mut v: i64 = if body[0] & 0x80 != 0 { -1 } else { 0 };
                for &x in body {
                    v = (v << 8) | x as i64;
                }
                Ok(V::Int(v))
            }
            6 if (1..=8).contains(&k) => Ok(V::UInt(body.iter().fold(0u64, |a, &x| (a << 8) | x as u64))),
            _ => Err(self.err(at, &format!("unsupported element 0x{:02x} of {} bytes", self.d[at], k))),
        }
    }

    fn skip_n(&mut self, count: usize, depth: u32) -> Result<(), String> {
        for _ in 0..count {
            if let V::List(n) = self.value()? {
                if depth >= MAX_DEPTH {
                    return Err(self.err(self.p, "lists nested too deeply"));
                }
                self.skip_n(n, depth + 1)?;
            }
        }
        Ok(())
    }

    fn skip(&mut self) -> Result<(), String> {
        self.skip_n(1, 0)
    }

    fn list(&mut self, want: usize, what: &str) -> Result<(), String> {
        let at = self.p;
        match self.value()? {
            V::List(n) if n == want => Ok(()),
            V::List(n) => Err(self.err(at, &format!("{} is a list of {}, expected {}", what, n, want))),
            v => Err(self.err(at, &format!("{} is {:?}, expected a list of {}", what, short(v), want))),
        }
    }
}

fn short(v: V<'_>) -> &'static str {
    match v {
        V::Absent => "not set",
        V::Bytes(_) => "an octet string",
        V::Bool(_) => "a boolean",
        V::Int(_) => "an integer",
        V::UInt(_) => "an unsigned integer",
        V::List(_) => "a list",
    }
}

struct Entry<'a> {
    obis: &'a [u8],
    unit: Option<u8>,
    scaler: i32,
    value: V<'a>,
}

/// A GetList.Res body: list of 7 (clientId, serverId, listName, actSensorTime, valList,
/// listSignature, actGatewayTime).
fn get_list<'a>(p: &mut P<'a>, entries: &mut Vec<Entry<'a>>, server: &mut Option<&'a [u8]>) -> Result<(), String> {
    p.list(7, "GetList.Res")?;
    p.skip()?; // clientId
    match p.value()? {
        V::Bytes(s) => *server = Some(s),
        V::List(n) => p.skip_n(n, 1)?,
        _ => {}
    }
    p.skip()?; // listName
    p.skip()?; // actSensorTime
    let at = p.p;
    let n = match p.value()? {
        V::List(n) => n,
        V::Absent => 0,
        v => return Err(p.err(at, &format!("valList is {}, expected a list", short(v)))),
    };
    for _ in 0..n {
        p.list(7, "SML_ListEntry")?;
        let at = p.p;
        let obis = match p.value()? {
            V::Bytes(b) => b,
            v => return Err(p.err(at, &format!("objName is {}, expected an octet string", short(v)))),
        };
        p.skip()?; // status
        p.skip()?; // valTime
        let at = p.p;
        let unit = match p.value()? {
            V::Absent => None,
            V::UInt(u) if u <= 255 => Some(u as u8),
            v => return Err(p.err(at, &format!("unit is {}, expected an Unsigned8", short(v)))),
        };
        let at = p.p;
        let scaler = match p.value()? {
            V::Absent => 0,
            V::Int(s) if (-128..=127).contains(&s) => s as i32,
            V::UInt(s) if s <= 255 => s as u8 as i8 as i32, // some meters send it unsigned
            v => return Err(p.err(at, &format!("scaler is {}, expected an Integer8", short(v)))),
        };
        let value = p.value()?;
        if let V::List(k) = value {
            p.skip_n(k, 1)?; // a structured value: not a measurement
        }
        p.skip()?; // valueSignature
        entries.push(Entry { obis, unit, scaler, value });
    }
    p.skip()?; // listSignature
    p.skip()?; // actGatewayTime
    Ok(())
}

/// One SML message at `p.p`; its entries are appended only if it parses and its CRC matches.
/// `Err`: the data cannot be parsed on; `Ok(Some(e))`: this message's CRC is wrong (its entries
/// are dropped, the next message is read).
fn message<'a>(cfg: &Config, p: &mut P<'a>, entries: &mut Vec<Entry<'a>>, server: &mut Option<&'a [u8]>) -> Result<Option<String>, String> {
    let start = p.p;
    p.list(6, "SML message")?;
    p.skip()?; // transactionId
    p.skip()?; // groupNo
    p.skip()?; // abortOnError
    p.list(2, "messageBody")?;
    let at = p.p;
    let tag = match p.value()? {
        V::UInt(t) => t,
        v => return Err(p.err(at, &format!("the messageBody tag is {}, expected an Unsigned32", short(v)))),
    };
    let mark = entries.len();
    let mut srv = None;
    if tag == 0x0701 {
        get_list(p, entries, &mut srv)?;
    } else {
        p.skip()?; // Open, Close, GetProcParameter ...: nothing to measure
    }
    let crc_at = p.p;
    let crc = match p.value()? {
        V::UInt(c) if c <= 0xFFFF => c as u16,
        v => {
            entries.truncate(mark);
            return Err(p.err(crc_at, &format!("the message crc16 is {}, expected an Unsigned16", short(v))));
        }
    };
    if p.d.get(p.p) == Some(&0) {
        p.p += 1;
    } else {
        entries.truncate(mark);
        return Err(p.err(p.p, "the message has no end marker (0x00)"));
    }
    if cfg.crc == Crc::Check {
        let want = crc16(&p.d[start..crc_at]).swap_bytes();
        if want != crc {
            entries.truncate(mark);
            return Ok(Some(format!(
                "message CRC mismatch in the message at byte {} of the message data: got 0x{:04X}, computed 0x{:04X}; its entries are dropped",
                start, crc, want
            )));
        }
    }
    if srv.is_some() {
        *server = srv;
    }
    Ok(None)
}

// --- names and units ---------------------------------------------------------------------------

/// OBIS C.D.E of group A = 1 (electricity), B = 0, F = 255 -> name.
const OBIS_NAMES: &[([u8; 3], &str)] = &[
    ([1, 8, 0], "energy_import"),
    ([1, 8, 1], "energy_import_t1"),
    ([1, 8, 2], "energy_import_t2"),
    ([1, 8, 3], "energy_import_t3"),
    ([1, 8, 4], "energy_import_t4"),
    ([2, 8, 0], "energy_export"),
    ([2, 8, 1], "energy_export_t1"),
    ([2, 8, 2], "energy_export_t2"),
    ([1, 7, 0], "power_import"),
    ([2, 7, 0], "power_export"),
    ([16, 7, 0], "power"),
    ([15, 7, 0], "power_absolute"),
    ([36, 7, 0], "power_l1"),
    ([56, 7, 0], "power_l2"),
    ([76, 7, 0], "power_l3"),
    ([32, 7, 0], "voltage_l1"),
    ([52, 7, 0], "voltage_l2"),
    ([72, 7, 0], "voltage_l3"),
    ([31, 7, 0], "current_l1"),
    ([51, 7, 0], "current_l2"),
    ([71, 7, 0], "current_l3"),
    ([91, 7, 0], "current_neutral"),
    ([14, 7, 0], "frequency"),
    ([13, 7, 0], "power_factor"),
    ([81, 7, 1], "angle_u_l2_u_l1"),
    ([81, 7, 2], "angle_u_l3_u_l1"),
    ([81, 7, 4], "angle_i_l1_u_l1"),
    ([81, 7, 15], "angle_i_l2_u_l2"),
    ([81, 7, 26], "angle_i_l3_u_l3"),
    ([0, 0, 9], "server_id"),
    ([0, 0, 0], "meter_id"),
    ([96, 1, 0], "meter_id"),
    ([96, 5, 0], "status"),
    ([0, 2, 0], "firmware"),
];

fn name_of(cfg: &Config, obis: &[u8]) -> String {
    if let Ok(code) = <[u8; 6]>::try_from(obis) {
        for (c, n) in &cfg.names {
            if *c == code {
                return n.clone();
            }
        }
        if code[5] == 255 && code[0] == 1 && code[1] == 0 {
            if let Some((_, n)) = OBIS_NAMES.iter().find(|(c, _)| *c == code[2..5]) {
                return (*n).to_string();
            }
        }
        if code[..5] == [129, 129, 199, 130, 3] || code == [1, 0, 96, 50, 1, 1] {
            return "manufacturer".to_string();
        }
        if code[..5] == [129, 129, 199, 130, 5] {
            return "public_key".to_string();
        }
        let mut s = format!("obis_{}_{}_{}_{}_{}", code[0], code[1], code[2], code[3], code[4]);
        if code[5] != 255 {
            s.push_str(&format!("_{}", code[5]));
        }
        return s;
    }
    let mut s = String::from("obis_");
    for b in obis.iter().take(16) {
        s.push_str(&format!("{:02x}", b));
    }
    s
}

/// DLMS/COSEM unit codes (IEC 62056-62) as used by SML's unit field.
fn unit_of(code: u8) -> &'static str {
    match code {
        1 => "a",
        2 => "mo",
        3 => "wk",
        4 => "d",
        5 => "h",
        6 => "min",
        7 => "s",
        8 => "°",
        9 => "°C",
        10 => "currency",
        11 => "m",
        12 => "m/s",
        13 | 14 => "m³",
        15 | 16 => "m³/h",
        17 | 18 => "m³/d",
        19 => "l",
        20 => "kg",
        21 => "N",
        22 => "Nm",
        23 => "Pa",
        24 => "bar",
        25 => "J",
        26 => "J/h",
        27 => "W",
        28 => "VA",
        29 => "var",
        30 => "Wh",
        31 => "VAh",
        32 => "varh",
        33 => "A",
        34 => "C",
        35 => "V",
        36 => "V/m",
        37 => "F",
        38 => "Ω",
        39 => "Ωm²/m",
        40 => "Wb",
        41 => "T",
        42 => "A/m",
        43 => "H",
        44 => "Hz",
        45 => "1/(Wh)",
        46 => "1/(varh)",
        47 => "1/(VAh)",
        48 => "V²h",
        49 => "A²h",
        50 => "kg/s",
        51 => "S",
        52 => "K",
        53 => "1/(V²h)",
        54 => "1/(A²h)",
        55 => "1/m³",
        56 => "%",
        57 => "Ah",
        60 => "Wh/m³",
        61 => "J/m³",
        62 => "mol%",
        63 => "g/m³",
        64 => "Pa s",
        65 => "J/kg",
        70 => "dBm",
        71 => "dBµV",
        72 => "dB",
        _ => "",
    }
}

const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// raw * 10^exp, correctly rounded for |exp| <= 22 and |raw| <= 2^53 (one division or product).
fn scaled(raw: f64, exp: i32) -> f64 {
    if exp < 0 {
        let k = (-exp) as usize;
        if k < POW10.len() {
            raw / POW10[k]
        } else {
            raw / 10f64.powi(-exp)
        }
    } else if (exp as usize) < POW10.len() {
        raw * POW10[exp as usize]
    } else {
        raw * 10f64.powi(exp)
    }
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * b.len());
    for &x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

fn emit(cfg: &mut Config, e: &Entry<'_>, device: Option<&str>, out: &mut Output) {
    let code = e.unit.unwrap_or(255);
    let mut unit = unit_of(code);
    let mut exp = e.scaler;
    if cfg.kwh {
        let k = match code {
            30 => Some("kWh"),
            31 => Some("kVAh"),
            32 => Some("kvarh"),
            _ => None,
        };
        if let Some(k) = k {
            unit = k;
            exp -= 3;
        }
    }
    let s;
    let value: Value<'_> = match e.value {
        V::Int(v) if unit.is_empty() && exp == 0 => Value::I64(v),
        V::UInt(v) if unit.is_empty() && exp == 0 && v <= i64::MAX as u64 => Value::I64(v as i64),
        V::Int(v) => Value::F64(scaled(v as f64, exp)),
        V::UInt(v) => Value::F64(scaled(v as f64, exp)),
        V::Bool(b) => Value::Bool(b),
        V::Bytes(b) => {
            if !cfg.strings {
                return;
            }
            s = if b.iter().all(|&c| (0x20..0x7f).contains(&c)) {
                String::from_utf8_lossy(b).into_owned()
            } else {
                hex(b)
            };
            Value::Str(&s)
        }
        V::Absent | V::List(_) => return,
    };
    let obis = match <[u8; 6]>::try_from(e.obis) {
        Ok(o) => o,
        Err(_) => return out.measurement_ex(&name_of(cfg, e.obis), value, unit, Quality::Good, device, None),
    };
    let at = match cfg.keys.iter().position(|(o, u, _)| *o == obis && *u == code) {
        Some(at) => at,
        None if cfg.keys.len() < MAX_KEYS => {
            let key = Key::new(&name_of(cfg, e.obis), unit);
            cfg.keys.push((obis, code, key));
            cfg.keys.len() - 1
        }
        None => return out.measurement_ex(&name_of(cfg, e.obis), value, unit, Quality::Good, device, None),
    };
    out.put_ex(&cfg.keys[at].2, value, device, None);
}

// --- the transport layer -----------------------------------------------------------------------

const ESC: [u8; 4] = [0x1b; 4];
const START: [u8; 8] = [0x1b, 0x1b, 0x1b, 0x1b, 1, 1, 1, 1];

fn find_start(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 8 <= b.len() {
        if b[i] == 0x1b && b[i..i + 8] == START {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The frame starting at `s` (its start sequence); returns where scanning goes on.
fn frame(cfg: &mut Config, b: &[u8], s: usize, out: &mut Output) -> usize {
    let mut data = core::mem::take(&mut cfg.buf);
    data.clear();
    // Data without escaped 1b1b1b1b blocks (nearly every frame) is decoded in place; `run` is
    // where the part not yet copied to `data` starts once one is found.
    let mut escaped = false;
    let mut run = s + 8;
    let mut q = s + 8;
    let next = loop {
        if q + 4 > b.len() {
            out.error(format_args!(
                "incomplete frame at byte {}: the burst ended after {} bytes without an end sequence (set idle longer, or check the reading head)",
                s,
                b.len() - s
            ));
            break b.len();
        }
        if b[q] != 0x1b || b[q..q + 4] != ESC {
            q += 4;
            continue;
        }
        if q + 8 > b.len() {
            out.error(format_args!("incomplete frame at byte {}: the burst ended inside an escape sequence", s));
            break b.len();
        }
        let esc = &b[q + 4..q + 8];
        if esc == ESC {
            data.extend_from_slice(&b[run..q + 4]);
            escaped = true;
            q += 8;
            run = q;
            continue;
        }
        if esc == [1, 1, 1, 1] {
            out.error(format_args!("incomplete frame at byte {}: a new frame starts at byte {} before its end sequence", s, q));
            break q;
        }
        if esc[0] != 0x1a {
            out.error(format_args!(
                "frame at byte {}: unknown escape sequence 1b1b1b1b {} at byte {}; frame skipped",
                s,
                hex(esc),
                q
            ));
            break q + 8;
        }
        let pad = esc[1] as usize;
        let got = u16::from_le_bytes([esc[2], esc[3]]);
        if cfg.crc != Crc::Ignore {
            let want = crc16(&b[s..q + 6]);
            if got != want {
                out.error(format_args!(
                    "CRC mismatch in the frame at byte {}: the end sequence says 0x{:04X}, its bytes give 0x{:04X} (a lost or damaged byte)",
                    s, got, want
                ));
                break q + 8;
            }
        }
        let body: &[u8] = if escaped {
            data.extend_from_slice(&b[run..q]);
            &data
        } else {
            &b[s + 8..q]
        };
        if pad > 3 || pad > body.len() {
            out.error(format_args!("frame at byte {}: {} padding bytes in the end sequence (at most 3)", s, pad));
            break q + 8;
        }
        decode(cfg, &body[..body.len() - pad], s, out);
        break q + 8;
    };
    cfg.buf = data;
    next
}

fn decode(cfg: &mut Config, data: &[u8], s: usize, out: &mut Output) {
    let mut p = P { d: data, p: 0 };
    let mut entries: Vec<Entry<'_>> = Vec::new();
    let mut server = None;
    while p.p < data.len() {
        if data[p.p] == 0 {
            p.p += 1; // padding
            continue;
        }
        match message(cfg, &mut p, &mut entries, &mut server) {
            Ok(None) => {}
            Ok(Some(e)) => out.error(format_args!("frame at byte {}: {}", s, e)),
            Err(e) => {
                out.error(format_args!("frame at byte {}: {}", s, e));
                break;
            }
        }
    }
    let dev = match (cfg.device, server) {
        (DeviceFrom::ServerId, Some(id)) => Some(hex(id)),
        _ => None,
    };
    for e in &entries {
        emit(cfg, e, dev.as_deref(), out);
    }
}

fn process(cfg: &mut Config, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_BYTES {
        return Err(format!("expected serial bytes (kind 0), got kind {} ({})", m.kind, m.kind_name()));
    }
    let b = m.payload;
    let mut p = 0;
    while p < b.len() {
        let s = find_start(b, p);
        let upto = s.unwrap_or(b.len());
        if b[p..upto].iter().any(|&c| c != 0) {
            out.error(format_args!(
                "skipped {} bytes at byte {} outside a frame (the port opened mid-frame, or bytes were lost)",
                upto - p,
                p
            ));
        }
        match s {
            Some(s) => p = frame(cfg, b, s, out),
            None => break,
        }
    }
    Ok(())
}

flux_plugin! { state: Config, init_json: init, process: process }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_x25_check_value() {
        assert_eq!(crc16(b"123456789"), 0x906E);
    }

    #[test]
    fn obis_text() {
        assert_eq!(parse_obis("1-0:1.8.0"), Some([1, 0, 1, 8, 0, 255]));
        assert_eq!(parse_obis("1-0:96.50.1*1"), Some([1, 0, 96, 50, 1, 1]));
        assert_eq!(parse_obis("16.7.0"), Some([1, 0, 16, 7, 0, 255]));
        assert_eq!(parse_obis("1-0:1.8"), None);
    }

    #[test]
    fn never_panics_on_noise() {
        let cfg = Json::Object(Default::default());
        let mut c = init(&cfg).unwrap();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let base: Vec<u8> = START.iter().copied().chain([0x76, 0x05, 1, 2, 3, 4, 0x62, 0, 0x62, 0, 0x72, 0x63, 7, 1, 0x77]).collect();
        for n in 0..20_000usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut f = base.clone();
            for k in 0..(n % 40) {
                f.push((seed >> (k % 56)) as u8);
            }
            f.extend_from_slice(&[0x1b, 0x1b, 0x1b, 0x1b, 0x1a, (seed >> 8) as u8 & 3, 0, 0]);
            let mut buf = Vec::new();
            let mut out = Output::new(&mut buf, 0);
            let m = Message { index: 0, kind: 0, function: 0, address: 0, ts: 0.0, device: "d", topic: "", payload: &f };
            let _ = process(&mut c, &m, &mut out);
        }
    }
}
