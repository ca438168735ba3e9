//! vedirect: Victron VE.Direct text protocol -> measurements. See README.md.
//!
//! A block is a run of lines `\r\n<label>\t<value>` that ends with `\r\nChecksum\t<byte>`; the
//! sum of every byte of the block, the checksum byte included, is 0 modulo 256. One input
//! message (an idle-framed burst from the serial port) may hold several blocks (a BMV sends
//! two a second) and asynchronous HEX-protocol lines (`:...\n`), which are skipped.

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_BYTES;

#[derive(Clone, Copy, PartialEq)]
enum Unknown {
    Skip,
    Text,
    Error,
}

pub struct Config {
    unknown: Unknown,
    /// FIELDS' labels sorted, with their index: a binary search instead of a scan of 64 labels
    by_label: Vec<(&'static [u8], usize)>,
    /// the output key (name + unit, JSON-encoded once) of each of FIELDS
    keys: Vec<Key>,
    /// the values of one block, kept between calls (no allocation per block)
    values: Vec<(usize, Num)>,
}

/// A parsed value; text borrows from the input, so it is kept as a range.
#[derive(Clone, Copy)]
enum Num {
    F(f64),
    I(i64),
    B(bool),
    /// start and end of the text in the block body
    T(usize, usize),
}

impl Config {
    fn new(unknown: Unknown) -> Config {
        let mut by_label: Vec<(&'static [u8], usize)> = FIELDS.iter().enumerate().map(|(i, f)| (f.0.as_bytes(), i)).collect();
        by_label.sort_unstable();
        let keys = FIELDS.iter().map(|f| Key::new(f.1, f.2)).collect();
        Config { unknown, by_label, keys, values: Vec::with_capacity(32) }
    }
}

fn init(cfg: &Json) -> Result<Config, String> {
    let obj = cfg.as_object().ok_or("the config must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "unknown" | "source") {
            return Err(format!("unknown key {:?} (the only key is unknown)", key));
        }
    }
    let unknown = match obj.get("unknown") {
        None | Some(Json::Null) => Unknown::Skip,
        Some(Json::String(s)) if s == "skip" => Unknown::Skip,
        Some(Json::String(s)) if s == "text" => Unknown::Text,
        Some(Json::String(s)) if s == "error" => Unknown::Error,
        Some(v) => return Err(format!("unknown must be \"skip\", \"text\" or \"error\", got {}", v)),
    };
    Ok(Config::new(unknown))
}

/// How a label's value is read.
#[derive(Clone, Copy)]
enum Kind {
    /// integer / divisor, as a float (a division is exact where the spec's unit is decimal)
    Num(f64),
    /// ON / OFF
    OnOff,
    /// integer, exact (codes, counters, bit fields; `0x..` hex too)
    Int,
    /// text as sent
    Text,
}

/// label, measurement name, unit, kind (VE.Direct Protocol, "Text-mode": units as specified).
const FIELDS: &[(&str, &str, &str, Kind)] = &[
    ("V", "battery_voltage", "V", Kind::Num(1000.0)),
    ("V2", "battery2_voltage", "V", Kind::Num(1000.0)),
    ("V3", "battery3_voltage", "V", Kind::Num(1000.0)),
    ("VS", "aux_voltage", "V", Kind::Num(1000.0)),
    ("VM", "midpoint_voltage", "V", Kind::Num(1000.0)),
    ("DM", "midpoint_deviation", "%", Kind::Num(10.0)),
    ("VPV", "pv_voltage", "V", Kind::Num(1000.0)),
    ("PPV", "pv_power", "W", Kind::Num(1.0)),
    ("I", "battery_current", "A", Kind::Num(1000.0)),
    ("I2", "battery2_current", "A", Kind::Num(1000.0)),
    ("I3", "battery3_current", "A", Kind::Num(1000.0)),
    ("IL", "load_current", "A", Kind::Num(1000.0)),
    ("LOAD", "load_on", "", Kind::OnOff),
    ("T", "battery_temperature", "°C", Kind::Num(1.0)),
    ("P", "power", "W", Kind::Num(1.0)),
    ("CE", "consumed", "Ah", Kind::Num(1000.0)),
    ("SOC", "soc", "%", Kind::Num(10.0)),
    ("TTG", "time_to_go", "min", Kind::Num(1.0)),
    ("Alarm", "alarm", "", Kind::OnOff),
    ("Relay", "relay", "", Kind::OnOff),
    ("AR", "alarm_reason", "", Kind::Int),
    ("OR", "off_reason", "", Kind::Int),
    ("H1", "deepest_discharge", "Ah", Kind::Num(1000.0)),
    ("H2", "last_discharge", "Ah", Kind::Num(1000.0)),
    ("H3", "average_discharge", "Ah", Kind::Num(1000.0)),
    ("H4", "charge_cycles", "", Kind::Int),
    ("H5", "full_discharges", "", Kind::Int),
    ("H6", "cumulative_ah", "Ah", Kind::Num(1000.0)),
    ("H7", "min_battery_voltage", "V", Kind::Num(1000.0)),
    ("H8", "max_battery_voltage", "V", Kind::Num(1000.0)),
    ("H9", "since_full_charge", "s", Kind::Num(1.0)),
    ("H10", "auto_syncs", "", Kind::Int),
    ("H11", "low_voltage_alarms", "", Kind::Int),
    ("H12", "high_voltage_alarms", "", Kind::Int),
    ("H13", "low_aux_voltage_alarms", "", Kind::Int),
    ("H14", "high_aux_voltage_alarms", "", Kind::Int),
    ("H15", "min_aux_voltage", "V", Kind::Num(1000.0)),
    ("H16", "max_aux_voltage", "V", Kind::Num(1000.0)),
    ("H17", "discharged_energy", "kWh", Kind::Num(100.0)),
    ("H18", "charged_energy", "kWh", Kind::Num(100.0)),
    ("H19", "yield_total", "kWh", Kind::Num(100.0)),
    ("H20", "yield_today", "kWh", Kind::Num(100.0)),
    ("H21", "max_power_today", "W", Kind::Num(1.0)),
    ("H22", "yield_yesterday", "kWh", Kind::Num(100.0)),
    ("H23", "max_power_yesterday", "W", Kind::Num(1.0)),
    ("ERR", "error", "", Kind::Int),
    ("CS", "state", "", Kind::Int),
    ("MODE", "mode", "", Kind::Int),
    ("WARN", "warning_reason", "", Kind::Int),
    ("MPPT", "tracker_mode", "", Kind::Int),
    ("MON", "monitor_mode", "", Kind::Int),
    ("HSDS", "day_sequence", "", Kind::Int),
    ("AC_OUT_V", "ac_out_voltage", "V", Kind::Num(100.0)),
    ("AC_OUT_I", "ac_out_current", "A", Kind::Num(10.0)),
    ("AC_OUT_S", "ac_out_apparent_power", "VA", Kind::Num(1.0)),
    ("DC_IN_V", "dc_in_voltage", "V", Kind::Num(100.0)),
    ("DC_IN_I", "dc_in_current", "A", Kind::Num(10.0)),
    ("DC_IN_P", "dc_in_power", "W", Kind::Num(1.0)),
    ("PID", "product_id", "", Kind::Text),
    ("FW", "firmware", "", Kind::Text),
    ("FWE", "firmware", "", Kind::Text),
    ("SER#", "serial", "", Kind::Text),
    ("BMV", "model", "", Kind::Text),
];

fn lookup(cfg: &Config, label: &[u8]) -> Option<usize> {
    cfg.by_label.binary_search_by(|(l, _)| (*l).cmp(label)).ok().map(|k| cfg.by_label[k].1)
}

fn int(text: &str) -> Option<i64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.len() <= 16 => u64::from_str_radix(hex, 16).ok().map(|v| v as i64),
        Some(_) => None,
        None => text.parse::<i64>().ok(),
    }
}

fn shown(b: &[u8]) -> String {
    let cut = &b[..b.len().min(24)];
    let mut s: String = cut.iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' }).collect();
    if b.len() > cut.len() {
        s.push_str("...");
    }
    s
}

/// Decodes the lines of one checked block (`body`: without the Checksum line).
fn block(cfg: &mut Config, body: &[u8], out: &mut Output) -> Result<(), String> {
    // Parse everything first: a block decodes as a whole or not at all.
    let mut values = core::mem::take(&mut cfg.values);
    values.clear();
    let r = parse_block(cfg, body, &mut values);
    if r.is_ok() {
        for &(i, v) in &values {
            let key = &cfg.keys[i];
            match v {
                Num::F(x) => out.put(key, x),
                Num::I(x) => out.put(key, x),
                Num::B(x) => out.put(key, x),
                // the text was checked as UTF-8 while parsing
                Num::T(a, b) => out.put(key, core::str::from_utf8(&body[a..b]).unwrap_or("")),
            }
        }
        if cfg.unknown == Unknown::Text {
            for line in lines(body) {
                if let Some(tab) = line.iter().position(|&c| c == b'\t') {
                    if lookup(cfg, &line[..tab]).is_none() {
                        let label = core::str::from_utf8(&line[..tab]).unwrap_or("");
                        let text = core::str::from_utf8(&line[tab + 1..]).unwrap_or("");
                        let name: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
                        out.measurement(&format!("ve_{}", name), text, "");
                    }
                }
            }
        }
    }
    cfg.values = values;
    r
}

fn lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|&c| c == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).filter(|l| !l.is_empty())
}

fn parse_block(cfg: &Config, body: &[u8], values: &mut Vec<(usize, Num)>) -> Result<(), String> {
    let base = body.as_ptr() as usize;
    for line in lines(body) {
        let tab = line.iter().position(|&c| c == b'\t').ok_or_else(|| format!("line {:?} has no tab between label and value", shown(line)))?;
        let (label, raw) = (&line[..tab], &line[tab + 1..]);
        let text = core::str::from_utf8(raw).map_err(|_| format!("the value of {} is not text", shown(label)))?;
        match lookup(cfg, label) {
            Some(i) => {
                let (_, name, _, kind) = FIELDS[i];
                let value = match kind {
                    Kind::Num(divisor) => match text.parse::<i64>() {
                        // TTG -1 (the battery is not discharging): infinite, not a number of minutes
                        Ok(-1) if name == "time_to_go" => continue,
                        Ok(v) => Num::F(v as f64 / divisor),
                        // "---": not available (for instance T without a temperature sensor)
                        Err(_) if text.starts_with("---") => continue,
                        Err(_) => return Err(format!("{}: {:?} is not an integer", shown(label), text)),
                    },
                    Kind::OnOff => match text {
                        "ON" => Num::B(true),
                        "OFF" => Num::B(false),
                        _ => return Err(format!("{}: {:?} is not ON or OFF", shown(label), text)),
                    },
                    Kind::Int => Num::I(int(text).ok_or_else(|| format!("{}: {:?} is not an integer", shown(label), text))?),
                    Kind::Text => {
                        let start = raw.as_ptr() as usize - base;
                        Num::T(start, start + raw.len())
                    }
                };
                values.push((i, value));
            }
            None => {
                let label = core::str::from_utf8(label).map_err(|_| format!("label {} is not text", shown(label)))?;
                if cfg.unknown == Unknown::Error {
                    return Err(format!("unknown label {:?} (set unknown = \"skip\" or \"text\")", label));
                }
            }
        }
    }
    Ok(())
}

const CHECKSUM: &[u8] = b"\r\nChecksum\t";

/// Offset of the first `\r\nChecksum\t` in `b`: a test of the first byte at each position
/// before the whole comparison (`windows().position()` compared 11 bytes everywhere).
fn find_checksum(b: &[u8]) -> Option<usize> {
    let n = CHECKSUM.len();
    let mut i = 0;
    while i + n <= b.len() {
        if b[i] == b'\r' && b[i + 1] == b'\n' && b[i + 2] == b'C' && &b[i..i + n] == CHECKSUM {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn process(cfg: &mut Config, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_BYTES {
        return Err(format!("expected serial bytes (kind 0), got kind {} ({})", m.kind, m.kind_name()));
    }
    let b = m.payload;
    let mut p = 0;
    let mut blocks = 0;
    while p < b.len() {
        // HEX-protocol frames (":" ... "\n") may come between blocks: skip them.
        if b[p] == b':' {
            p += b[p..].iter().position(|&c| c == b'\n').map_or(b.len() - p, |i| i + 1);
            continue;
        }
        if matches!(b[p], b'\r' | b'\n') && !b[p..].starts_with(b"\r\n") || b[p..].iter().all(|&c| matches!(c, b'\r' | b'\n')) {
            p += 1;
            continue;
        }
        if !b[p..].starts_with(b"\r\n") {
            // The rest of a block whose start was lost: skip it, up to its Checksum line.
            let line_end = b[p..].windows(2).position(|w| w == b"\r\n").map_or(b.len(), |i| p + i);
            let next = match find_checksum(&b[p..]) {
                Some(i) => (p + i + CHECKSUM.len() + 1).min(b.len()),
                None => line_end,
            };
            out.error(format_args!(
                "incomplete block at byte {}: {:?}... has lost its start (the port opened mid-block, or bytes were lost); skipped to byte {}",
                p,
                shown(&b[p..line_end]),
                next
            ));
            p = next;
            continue;
        }
        let end = match find_checksum(&b[p..]) {
            Some(i) if p + i + CHECKSUM.len() < b.len() => p + i + CHECKSUM.len() + 1,
            _ => {
                out.error(format_args!("incomplete block at byte {}: no Checksum line after {:?}", p, shown(&b[p..])));
                break;
            }
        };
        let sum = b[p..end].iter().fold(0u8, |a, &c| a.wrapping_add(c));
        if sum != 0 {
            out.error(format_args!(
                "checksum mismatch in the block at byte {}: its bytes sum to 0x{:02X}, expected 0x00 (a lost or damaged byte)",
                p, sum
            ));
        } else if let Err(e) = block(cfg, &b[p..end - CHECKSUM.len() - 1], out) {
            out.error(e);
        }
        blocks += 1;
        p = end;
    }
    let _ = blocks;
    Ok(())
}

flux_plugin! { state: Config, init_json: init, process: process }

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(lines: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        for l in lines {
            b.extend_from_slice(b"\r\n");
            b.extend_from_slice(l.as_bytes());
        }
        b.extend_from_slice(CHECKSUM);
        let sum = b.iter().fold(0u8, |a, &c| a.wrapping_add(c));
        b.push(0u8.wrapping_sub(sum));
        b
    }

    fn run(payload: &[u8]) -> String {
        let cfg = Config::new(Unknown::Skip);
        let mut buf = Vec::new();
        {
            let mut out = Output::new(&mut buf, 0);
            let m = Message { index: 0, kind: 0, function: 0, address: 0, ts: 0.0, device: "d", topic: "", payload };
            let mut c = cfg;
            if let Err(e) = process(&mut c, &m, &mut out) {
                out.error(e);
            }
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn decodes_and_checks() {
        let f = frame(&["V\t12800", "I\t-1500", "LOAD\tON", "TTG\t-1", "T\t---"]);
        let o = run(&f);
        assert!(o.contains("\"battery_voltage\""), "{}", o);
        assert!(o.contains("-1.5"), "{}", o);
        assert!(!o.contains("time_to_go") && !o.contains("temperature"), "{}", o);
        let mut bad = f.clone();
        bad[5] ^= 1;
        assert!(run(&bad).contains("checksum mismatch"));
        assert!(run(&f[4..]).contains("incomplete block"));
        assert!(run(&f[..f.len() - 1]).contains("no Checksum line"));
    }

    #[test]
    fn never_panics_on_noise() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0..20_000usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut f = frame(&["V\t12800", "PID\t0xA053", "H19\t1234"]);
            let at = (seed as usize) % f.len();
            f[at] = (seed >> 32) as u8;
            f.truncate(f.len() - (n % 5));
            let _ = run(&f);
        }
    }
}
