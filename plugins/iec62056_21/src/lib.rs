//! iec62056_21: IEC 62056-21 (formerly IEC 61107, "D0") readouts from an optical port -> measurements.
//! See README.md.
//!
//! A readout is an identification message `/XXXZ<ident>CR LF` followed by a data message. In
//! protocol mode C (and A, B) the data message is `STX <data block> ! CR LF ETX BCC`, with BCC the
//! XOR of every byte after STX up to and including ETX. Meters that push in mode D (and many
//! German D0 meters) send the data block and `!` CR LF without STX, ETX and BCC.
//! A data block is lines of data sets `address(value*unit)`, where a data set may carry more
//! than one value group `(...)(...)` and a line more than one data set.
//! Bytes are read with bit 7 cleared: the port may be opened 8N1 on a 7E1 line (the parity bit
//! then arrives as bit 7).

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_BYTES;

const STX: u8 = 0x02;
const ETX: u8 = 0x03;
const ACK: u8 = 0x06;

pub struct Config {
    strings: bool,
    require_bcc: bool,
    names: Vec<(String, String)>,
    /// the bytes of one message with bit 7 cleared, kept between calls
    buf: Vec<u8>,
    /// address and unit as sent -> output key and "always text"; a meter sends the same data
    /// sets in the same order, so the next entry is tried first
    keys: Vec<(String, String, Key, bool)>,
}

/// Keys kept at most (a readout has a few dozen data sets).
const MAX_KEYS: usize = 256;

/// `1-0:1.8.0*255` -> `1.8.0`: the `*255` / `&255` of the current value and the `1-0:` of
/// electricity channel 0 are dropped, so "1-0:1.8.0*255" and "1.8.0" are the same code.
fn norm(addr: &str) -> &str {
    let a = addr.strip_prefix("1-0:").unwrap_or(addr);
    a.strip_suffix("*255").or_else(|| a.strip_suffix("&255")).unwrap_or(a)
}

fn init(cfg: &Json) -> Result<Config, String> {
    let obj = cfg.as_object().ok_or("the config must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "strings" | "require_bcc" | "names" | "source") {
            return Err(format!("unknown key {:?} (keys: strings, require_bcc, names)", key));
        }
    }
    let flag = |key: &str, default: bool| -> Result<bool, String> {
        match obj.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(v) => Err(format!("{} must be true or false, got {}", key, v)),
        }
    };
    let strings = flag("strings", true)?;
    let require_bcc = flag("require_bcc", false)?;
    let mut names = Vec::new();
    match obj.get("names") {
        None | Some(Json::Null) => {}
        Some(Json::Object(map)) => {
            for (code, name) in map {
                let name = name.as_str().filter(|s| !s.is_empty()).ok_or_else(|| format!("names.{}: the name must be a non-empty string", code))?;
                if code.is_empty() || code.contains(['(', ')', '!', '/']) {
                    return Err(format!("names: {:?} is not a data set address", code));
                }
                names.push((norm(code).to_string(), name.to_string()));
            }
        }
        Some(v) => return Err(format!("names must be a table of address = name, got {}", v)),
    }
    Ok(Config { strings, require_bcc, names, buf: Vec::new(), keys: Vec::new() })
}

/// Addresses (after [`norm`]) -> names: OBIS C.D.E of electricity, and the common service
/// codes. `true`: an identifier, date or time, always text (leading zeros kept).
const NAMES: &[(&str, &str, bool)] = &[
    ("1.8.0", "energy_import", false),
    ("1.8.1", "energy_import_t1", false),
    ("1.8.2", "energy_import_t2", false),
    ("1.8.3", "energy_import_t3", false),
    ("1.8.4", "energy_import_t4", false),
    ("2.8.0", "energy_export", false),
    ("2.8.1", "energy_export_t1", false),
    ("2.8.2", "energy_export_t2", false),
    ("3.8.0", "reactive_energy_import", false),
    ("4.8.0", "reactive_energy_export", false),
    ("15.8.0", "energy_absolute", false),
    ("1.7.0", "power_import", false),
    ("2.7.0", "power_export", false),
    ("16.7.0", "power", false),
    ("15.7.0", "power_absolute", false),
    ("21.7.0", "power_import_l1", false),
    ("41.7.0", "power_import_l2", false),
    ("61.7.0", "power_import_l3", false),
    ("36.7.0", "power_l1", false),
    ("56.7.0", "power_l2", false),
    ("76.7.0", "power_l3", false),
    ("32.7.0", "voltage_l1", false),
    ("52.7.0", "voltage_l2", false),
    ("72.7.0", "voltage_l3", false),
    ("31.7.0", "current_l1", false),
    ("51.7.0", "current_l2", false),
    ("71.7.0", "current_l3", false),
    ("14.7.0", "frequency", false),
    ("13.7.0", "power_factor", false),
    ("1.6.0", "max_demand_import", false),
    ("1.6.1", "max_demand_import_t1", false),
    ("1.6.2", "max_demand_import_t2", false),
    ("2.6.0", "max_demand_export", false),
    ("0.0.0", "meter_address", true),
    ("0.0.1", "meter_address_2", true),
    ("C.1.0", "meter_serial", true),
    ("C.1.1", "meter_type", true),
    ("0-0:96.1.0", "meter_id", true),
    ("96.1.0", "meter_id", true),
    ("0-0:96.1.255", "meter_id", true),
    ("96.5.0", "status", true),
    ("0.2.0", "firmware", true),
    ("0.9.1", "time", true),
    ("0.9.2", "date", true),
    ("F.F", "error_register", true),
    ("F.F.0", "error_register", true),
    ("C.7.0", "power_failures", false),
    ("0.1.0", "reset_count", false),
];

/// The name of a data set and whether its value is always text.
fn name_of<'a>(cfg: &'a Config, addr: &str, scratch: &'a mut String) -> (&'a str, bool) {
    let n = norm(addr);
    let known = NAMES.iter().find(|(c, _, _)| *c == n);
    let text = known.map_or(false, |k| k.2);
    if let Some((_, name)) = cfg.names.iter().find(|(c, _)| c == n) {
        return (name, text);
    }
    if let Some((_, name, _)) = known {
        return (name, text);
    }
    scratch.clear();
    scratch.push_str("obis_");
    for c in n.chars() {
        scratch.push(if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' });
    }
    (scratch, false)
}

/// A decimal number as the meter writes it (`0012345.678`, `-1.5`, `+3`): digits with at most
/// one point (or comma). Anything else (hex, letters, `1.2.3`) is text. Digits alone, with no
/// unit, are an integer (counters, status codes); otherwise a float.
fn value_of<'v>(s: &'v str, unit: &str) -> Option<Value<'v>> {
    if unit.is_empty() && s.len() <= 18 {
        let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
        if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
            return s.parse::<i64>().ok().map(Value::I64);
        }
    }
    number(s).map(Value::F64)
}

fn number(s: &str) -> Option<f64> {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    let mut point = false;
    let mut any = false;
    for c in digits.bytes() {
        match c {
            b'0'..=b'9' => any = true,
            b'.' | b',' if !point => point = true,
            _ => return None,
        }
    }
    if !any {
        return None;
    }
    if s.contains(',') {
        s.replace(',', ".").parse::<f64>().ok()
    } else {
        s.parse::<f64>().ok()
    }
}

fn shown(b: &[u8]) -> String {
    let cut = &b[..b.len().min(32)];
    let mut s: String = cut.iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' }).collect();
    if b.len() > cut.len() {
        s.push_str("...");
    }
    s
}

/// Decodes the data lines of one checked readout; a line it cannot read is one error and the
/// other lines still count.
fn data_block(cfg: &mut Config, block: &[u8], out: &mut Output) {
    let mut scratch = String::new();
    let mut hint = 0usize;
    let mut bad = 0;
    for line in block.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let text = match core::str::from_utf8(line) {
            Ok(t) => t,
            Err(_) => continue, // unreachable: bytes are 7-bit
        };
        let mut rest = text;
        while !rest.is_empty() {
            let open = match rest.find('(') {
                Some(i) => i,
                None => {
                    bad += 1;
                    if bad <= 3 {
                        out.error(format_args!("data line {:?}: {:?} has no (value)", shown(line), rest));
                    }
                    break;
                }
            };
            let addr = rest[..open].trim();
            let close = match rest[open..].find(')') {
                Some(i) => open + i,
                None => {
                    bad += 1;
                    if bad <= 3 {
                        out.error(format_args!("data line {:?}: a value group without its ')'", shown(line)));
                    }
                    break;
                }
            };
            let group = &rest[open + 1..close];
            // further value groups of this data set (a max demand's time stamp, a profile's
            // entries) are skipped
            let mut next = close + 1;
            while rest[next..].starts_with('(') {
                match rest[next..].find(')') {
                    Some(i) => next += i + 1,
                    None => {
                        next = rest.len();
                        break;
                    }
                }
            }
            rest = &rest[next..];
            if addr.is_empty() {
                continue; // a value group of a line that continues a data set
            }
            let (value, unit) = match group.rfind('*') {
                Some(star) => (&group[..star], &group[star + 1..]),
                None => (group, ""),
            };
            if value.is_empty() {
                continue;
            }
            let same = |k: &(String, String, Key, bool)| k.0 == addr && k.1 == unit;
            let at = match cfg.keys.get(hint) {
                Some(k) if same(k) => Some(hint),
                _ => cfg.keys.iter().position(same),
            };
            let at = match at {
                Some(at) => Some(at),
                None if cfg.keys.len() < MAX_KEYS => {
                    let (name, text) = name_of(cfg, addr, &mut scratch);
                    let key = Key::new(name, unit);
                    cfg.keys.push((addr.to_string(), unit.to_string(), key, text));
                    Some(cfg.keys.len() - 1)
                }
                None => None,
            };
            match at {
                Some(at) => {
                    hint = at + 1;
                    let (_, _, key, text) = &cfg.keys[at];
                    match if *text { None } else { value_of(value, unit) } {
                        Some(v) => out.put(key, v),
                        None if cfg.strings => out.put(key, value),
                        None => {}
                    }
                }
                None => {
                    let (name, text) = name_of(cfg, addr, &mut scratch);
                    match if text { None } else { value_of(value, unit) } {
                        Some(v) => out.measurement(name, v, unit),
                        None if cfg.strings => out.measurement(name, value, unit),
                        None => {}
                    }
                }
            }
        }
    }
    if bad > 3 {
        out.error(format_args!("{} more data lines could not be read", bad - 3));
    }
}

fn find(b: &[u8], from: usize, c: u8) -> Option<usize> {
    b[from..].iter().position(|&x| x == c).map(|i| from + i)
}

fn process(cfg: &mut Config, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_BYTES {
        return Err(format!("expected serial bytes (kind 0), got kind {} ({})", m.kind, m.kind_name()));
    }
    let mut buf = core::mem::take(&mut cfg.buf);
    buf.clear();
    buf.extend(m.payload.iter().map(|&c| c & 0x7F));
    let r = readouts(cfg, &buf, out);
    cfg.buf = buf;
    r
}

fn readouts(cfg: &mut Config, b: &[u8], out: &mut Output) -> Result<(), String> {
    let mut p = 0;
    while p < b.len() {
        // What comes before an identification message: a request or acknowledgement echoed by
        // the reading head (`/?...!` CR LF, ACK ... CR LF), line ends and NULs are skipped
        // silently; anything else is the rest of a readout whose start was lost.
        if b[p..].starts_with(b"/?") || b[p] == ACK {
            // up to its CR LF, but never past the start of an identification message
            let eol = find(b, p, b'\n').map_or(b.len(), |i| i + 1);
            p = find(&b[..eol], p + 1, b'/').unwrap_or(eol);
            continue;
        }
        if matches!(b[p], b'\r' | b'\n' | 0) {
            p += 1;
            continue;
        }
        if b[p] != b'/' {
            let next = find(b, p, b'/').unwrap_or(b.len());
            out.error(format_args!(
                "skipped {} bytes at byte {} before an identification message: {:?} (the port opened mid-readout, or bytes were lost)",
                next - p,
                p,
                shown(&b[p..next])
            ));
            p = next;
            continue;
        }
        // identification message
        let start = p;
        let eol = match find(b, p, b'\n') {
            Some(i) => i,
            None => {
                out.error(format_args!("incomplete readout at byte {}: {:?} (the burst ended inside it)", p, shown(&b[p..])));
                return Ok(());
            }
        };
        let ident_line = &b[p + 1..eol];
        let ident_line = ident_line.strip_suffix(b"\r").unwrap_or(ident_line);
        if ident_line.len() < 5 || !ident_line[..3].iter().all(u8::is_ascii_alphabetic) {
            out.error(format_args!("identification message at byte {} is malformed: {:?} (expected /XXXZident)", p, shown(ident_line)));
            p = eol + 1;
            continue;
        }
        p = eol + 1;
        // the data message: STX block ! CR LF ETX BCC, or (push mode) block ! CR LF
        while p < b.len() && matches!(b[p], b'\r' | b'\n') {
            p += 1;
        }
        let framed = p < b.len() && b[p] == STX;
        let body = if framed { p + 1 } else { p };
        let bang = match b[body..].windows(3).position(|w| w == b"!\r\n") {
            Some(i) => body + i,
            None => match b[body..].windows(2).position(|w| w == b"!\n") {
                Some(i) => body + i,
                None => {
                    out.error(format_args!(
                        "incomplete readout at byte {}: no end line \"!\" after {} bytes (set idle longer, or raise max_frame)",
                        start,
                        b.len() - start
                    ));
                    return Ok(());
                }
            },
        };
        // A new identification message before the "!": this readout lost its end.
        if let Some(slash) = find(&b[..bang], body, b'/') {
            if b[slash..].len() > 4 && b[slash + 1..slash + 4].iter().all(u8::is_ascii_alphabetic) && b[slash + 4].is_ascii_alphanumeric() {
                out.error(format_args!("incomplete readout at byte {}: a new identification message starts at byte {}", start, slash));
                p = slash;
                continue;
            }
        }
        let after = find(b, bang, b'\n').map_or(b.len(), |i| i + 1);
        if framed {
            if after + 2 > b.len() || b[after] != ETX {
                out.error(format_args!("incomplete readout at byte {}: no ETX and BCC after the end line \"!\"", start));
                return Ok(());
            }
            let bcc = b[body..=after].iter().fold(0u8, |a, &c| a ^ c);
            if bcc != b[after + 1] {
                out.error(format_args!(
                    "BCC mismatch in the readout at byte {}: got 0x{:02X}, its bytes give 0x{:02X} (a lost or damaged byte)",
                    start,
                    b[after + 1],
                    bcc
                ));
                p = after + 2;
                continue;
            }
            p = after + 2;
        } else {
            if b.get(after) == Some(&ETX) {
                out.error(format_args!(
                    "readout at byte {} ends with ETX but has no STX (a lost or damaged byte); not decoded",
                    start
                ));
                p = (after + 2).min(b.len());
                continue;
            }
            if cfg.require_bcc {
                out.error(format_args!(
                    "readout at byte {} has no STX/ETX/BCC (push mode); set require_bcc = false to accept it",
                    start
                ));
                p = after;
                continue;
            }
            p = after;
        }
        if cfg.strings {
            let ident = String::from_utf8_lossy(ident_line);
            out.measurement("ident", &*ident, "");
        }
        data_block(cfg, &b[body..bang], out);
    }
    Ok(())
}

flux_plugin! { state: Config, init_json: init, process: process }

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cfg: &mut Config, payload: &[u8]) -> String {
        let mut buf = Vec::new();
        {
            let mut out = Output::new(&mut buf, 0);
            let m = Message { index: 0, kind: 0, function: 0, address: 0, ts: 0.0, device: "d", topic: "", payload };
            let _ = process(cfg, &m, &mut out);
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn numbers() {
        assert_eq!(number("0012345.678"), Some(12345.678));
        assert_eq!(number("-1,5"), Some(-1.5));
        assert_eq!(number("12.3.4"), None);
        assert_eq!(number("1A"), None);
        assert_eq!(number("."), None);
        assert_eq!(norm("1-0:1.8.0*255"), "1.8.0");
    }

    #[test]
    fn never_panics_on_noise() {
        let mut c = init(&Json::Object(Default::default())).unwrap();
        let base = b"/ISk5MT174-0001\r\n\x020.0.0(123)\r\n1.8.0(0001.5*kWh)(x\r\n!\r\n\x03\x00".to_vec();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0..20_000usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut f = base.clone();
            let at = (seed as usize) % f.len();
            f[at] = (seed >> 32) as u8;
            f.truncate(f.len() - (n % 7));
            let _ = run(&mut c, &f);
        }
    }
}
