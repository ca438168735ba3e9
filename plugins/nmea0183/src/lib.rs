//! nmea0183: NMEA 0183 sentences -> measurements. One input message (kind 0) is one sentence,
//! as a serial source with `delimiter = "\r\n"` (or "\n") frames it. The `*hh` checksum is
//! checked; GGA, RMC, GLL, VTG, HDT (position, motion, heading), MTW, MWV (marine sensors) and
//! XDR (any transducer) are decoded. See README.md.

use flux_plugin_sdk::prelude::*;
use flux_plugin_sdk::serde_json::Value as Json;
use flux_plugin_sdk::KIND_BYTES;

/// The sentence types this plugin decodes.
const KNOWN: [&str; 8] = ["GGA", "RMC", "GLL", "VTG", "HDT", "MTW", "MWV", "XDR"];

/// Longest part of a sentence quoted in an error message.
const EXCERPT: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unknown {
    Skip,
    Error,
}

#[derive(Debug)]
pub struct Config {
    require_checksum: bool,
    unknown: Unknown,
    /// Decoded types that are emitted (default: all of KNOWN).
    sentences: Vec<&'static str>,
}

fn init(cfg: &Json) -> Result<Config, String> {
    let obj = cfg.as_object().ok_or("the config must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "require_checksum" | "unknown" | "sentences" | "source") {
            return Err(format!(
                "unknown key {:?} (the keys are require_checksum, unknown and sentences)",
                key
            ));
        }
    }
    let require_checksum = match obj.get("require_checksum") {
        None | Some(Json::Null) => true,
        Some(Json::Bool(b)) => *b,
        Some(other) => return Err(format!("require_checksum must be true or false, got {}", other)),
    };
    let unknown = match obj.get("unknown") {
        None | Some(Json::Null) => Unknown::Skip,
        Some(Json::String(s)) if s == "skip" => Unknown::Skip,
        Some(Json::String(s)) if s == "error" => Unknown::Error,
        Some(other) => return Err(format!("unknown must be \"skip\" or \"error\", got {}", other)),
    };
    let sentences = match obj.get("sentences") {
        None | Some(Json::Null) => KNOWN.to_vec(),
        Some(Json::Array(items)) => {
            let mut list = Vec::new();
            for item in items {
                let name = item.as_str().map(str::to_ascii_uppercase);
                match name.as_deref().and_then(|n| KNOWN.iter().find(|k| **k == n)) {
                    Some(k) => list.push(*k),
                    None => {
                        return Err(format!(
                            "sentences: {} is not a sentence type this plugin decodes ({})",
                            item,
                            KNOWN.join(", ")
                        ))
                    }
                }
            }
            if list.is_empty() {
                return Err("sentences is empty: nothing would be decoded".to_string());
            }
            list
        }
        Some(other) => return Err(format!("sentences must be a list like [\"GGA\", \"RMC\"], got {}", other)),
    };
    debug!(
        "decoding {} (checksum {}, other sentences: {:?})",
        sentences.join(", "),
        if require_checksum { "required" } else { "optional" },
        unknown
    );
    Ok(Config { require_checksum, unknown, sentences })
}

// --- values -------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Val {
    F(f64),
    I(i64),
    B(bool),
}

#[derive(Debug, Clone, PartialEq)]
struct Point {
    name: String,
    value: Val,
    unit: &'static str,
    quality: Quality,
}

/// The measurements of one sentence, collected before anything is written: a sentence either
/// decodes as a whole or is one error.
#[derive(Default)]
struct Points(Vec<Point>);

impl Points {
    fn push(&mut self, name: &str, value: Option<Val>, unit: &'static str, quality: Quality) {
        if let Some(value) = value {
            self.0.push(Point { name: name.to_string(), value, unit, quality });
        }
    }
    fn f(&mut self, name: &str, value: Option<f64>, unit: &'static str, quality: Quality) {
        self.push(name, value.map(Val::F), unit, quality)
    }
}

fn excerpt(s: &str) -> String {
    if s.len() <= EXCERPT {
        format!("{:?}", s)
    } else {
        // s is ASCII here: any index is a char boundary
        format!("{:?}...", &s[..EXCERPT - 3])
    }
}

/// A number field; empty -> None.
fn number(field: &str, what: &str) -> Result<Option<f64>, String> {
    if field.is_empty() {
        return Ok(None);
    }
    let b = field.as_bytes();
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    let ok = digits > 0 && b.iter().all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'+'));
    match field.parse::<f64>() {
        Ok(v) if ok && v.is_finite() => Ok(Some(v)),
        _ => Err(format!("{} {:?} is not a number", what, field)),
    }
}

/// A whole-number field; empty -> None.
fn integer(field: &str, what: &str) -> Result<Option<i64>, String> {
    if field.is_empty() {
        return Ok(None);
    }
    if field.len() > 9 || !field.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("{} {:?} is not a whole number", what, field));
    }
    field.parse::<i64>().map(Some).map_err(|_| format!("{} {:?} is not a whole number", what, field))
}

/// `ddmm.mmmm` (latitude, `max_deg` 90) or `dddmm.mmmm` (longitude, 180) and its hemisphere
/// letter -> signed decimal degrees. Both empty -> None.
fn coordinate(value: &str, hemi: &str, what: &str, max_deg: f64, neg: &str, pos: &str) -> Result<Option<f64>, String> {
    if value.is_empty() && hemi.is_empty() {
        return Ok(None);
    }
    if value.is_empty() || hemi.is_empty() {
        return Err(format!("{} {:?} comes without its {}/{} letter {:?}", what, value, pos, neg, hemi));
    }
    let sign = if hemi == pos {
        1.0
    } else if hemi == neg {
        -1.0
    } else {
        return Err(format!("{} hemisphere must be {} or {}, got {:?}", what, pos, neg, hemi));
    };
    let int_len = value.find('.').unwrap_or(value.len());
    let bad = || format!("{} {:?} is not degrees and minutes ({}mm.mmmm)", what, value, if max_deg > 90.0 { "ddd" } else { "dd" });
    if int_len < 3 || int_len > 5 || !value.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return Err(bad());
    }
    let degrees: f64 = value[..int_len - 2].parse::<u32>().map_err(|_| bad())?.into();
    let minutes: f64 = value[int_len - 2..].parse().map_err(|_| bad())?;
    if minutes >= 60.0 {
        return Err(format!("{} {:?}: minutes {} must be below 60", what, value, minutes));
    }
    let deg = degrees + minutes / 60.0;
    if deg > max_deg {
        return Err(format!("{} {:?} is beyond {} degrees", what, value, max_deg));
    }
    Ok(Some(sign * deg))
}

fn status(field: &str, what: &str) -> Result<Quality, String> {
    match field {
        "A" => Ok(Quality::Good),
        "V" => Ok(Quality::Bad),
        _ => Err(format!("{} must be A (valid) or V (void), got {:?}", what, field)),
    }
}

/// FAA mode indicator (NMEA 2.3+): N = data not valid.
fn mode_quality(f: &[&str], i: usize) -> Quality {
    match f.get(i) {
        Some(&"N") => Quality::Bad,
        _ => Quality::Good,
    }
}

fn worse(a: Quality, b: Quality) -> Quality {
    if a == Quality::Bad || b == Quality::Bad {
        Quality::Bad
    } else {
        Quality::Good
    }
}

fn need(f: &[&str], n: usize, ty: &str) -> Result<(), String> {
    if f.len() < n {
        return Err(format!("{} sentence has {} data fields, expected at least {}", ty, f.len(), n));
    }
    Ok(())
}

fn metres(unit: &str, what: &str) -> Result<&'static str, String> {
    match unit {
        "M" | "" => Ok("m"),
        "f" | "F" => Ok("ft"),
        _ => Err(format!("{} unit must be M (metres), got {:?}", what, unit)),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = (if y >= 0 { y } else { y - 399 }) / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn two_digits(s: &str, at: usize) -> Option<i64> {
    let b = s.as_bytes().get(at..at + 2)?;
    if b[0].is_ascii_digit() && b[1].is_ascii_digit() {
        Some(i64::from(b[0] - b'0') * 10 + i64::from(b[1] - b'0'))
    } else {
        None
    }
}

/// RMC time `hhmmss(.sss)` and date `ddmmyy` -> unix seconds (two-digit years: 80-99 are
/// 1980-1999, 00-79 are 2000-2079). Either empty -> None.
fn unix_time(time: &str, date: &str) -> Result<Option<f64>, String> {
    if time.is_empty() || date.is_empty() {
        return Ok(None);
    }
    let bad_time = || format!("time {:?} is not hhmmss.ss", time);
    let (h, mi) = (two_digits(time, 0).ok_or_else(bad_time)?, two_digits(time, 2).ok_or_else(bad_time)?);
    let sec: f64 = match time.get(4..) {
        Some(s) if s.len() >= 2 && s.as_bytes()[..2].iter().all(u8::is_ascii_digit) => s.parse().map_err(|_| bad_time())?,
        _ => return Err(bad_time()),
    };
    if h > 23 || mi > 59 || !(0.0..61.0).contains(&sec) {
        return Err(format!("time {:?} is out of range", time));
    }
    let bad_date = || format!("date {:?} is not ddmmyy", date);
    if date.len() != 6 {
        return Err(bad_date());
    }
    let (d, mo, yy) = (
        two_digits(date, 0).ok_or_else(bad_date)?,
        two_digits(date, 2).ok_or_else(bad_date)?,
        two_digits(date, 4).ok_or_else(bad_date)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(format!("date {:?} is out of range", date));
    }
    let year = if yy >= 80 { 1900 + yy } else { 2000 + yy };
    let days = days_from_civil(year, mo, d);
    Ok(Some((days * 86400 + h * 3600 + mi * 60) as f64 + sec))
}

// --- sentences ----------------------------------------------------------------------------------

fn gga(f: &[&str], p: &mut Points) -> Result<(), String> {
    need(f, 14, "GGA")?;
    let lat = coordinate(f[1], f[2], "latitude", 90.0, "S", "N")?;
    let lon = coordinate(f[3], f[4], "longitude", 180.0, "W", "E")?;
    let fix = integer(f[5], "fix quality")?;
    let sats = integer(f[6], "satellites")?;
    let hdop = number(f[7], "hdop")?;
    let alt = number(f[8], "altitude")?;
    let alt_unit = if alt.is_some() { metres(f[9], "altitude")? } else { "m" };
    let sep = number(f[10], "geoid separation")?;
    let sep_unit = if sep.is_some() { metres(f[11], "geoid separation")? } else { "m" };
    // fix quality 0 = no fix: a position it comes with is not to be trusted
    let q = if fix == Some(0) { Quality::Bad } else { Quality::Good };
    p.f("latitude", lat, "°", q);
    p.f("longitude", lon, "°", q);
    p.push("fix_quality", fix.map(Val::I), "", Quality::Good);
    p.push("satellites", sats.map(Val::I), "", Quality::Good);
    p.f("hdop", hdop, "", Quality::Good);
    p.f("altitude", alt, alt_unit, q);
    p.f("geoid_separation", sep, sep_unit, q);
    Ok(())
}

fn rmc(f: &[&str], p: &mut Points) -> Result<(), String> {
    need(f, 11, "RMC")?;
    let q = worse(status(f[1], "RMC status")?, mode_quality(f, 11));
    let time = unix_time(f[0], f[8])?;
    let lat = coordinate(f[2], f[3], "latitude", 90.0, "S", "N")?;
    let lon = coordinate(f[4], f[5], "longitude", 180.0, "W", "E")?;
    let speed = number(f[6], "speed over ground")?;
    let course = number(f[7], "course over ground")?;
    let var = magnetic_variation(f[9], f[10])?;
    p.push("fix_valid", Some(Val::B(q == Quality::Good)), "", Quality::Good);
    p.f("latitude", lat, "°", q);
    p.f("longitude", lon, "°", q);
    p.f("speed_kn", speed, "kn", q);
    p.f("course", course, "°", q);
    p.f("magnetic_variation", var, "°", q);
    p.f("utc_time", time, "s", q);
    Ok(())
}

/// Magnetic variation in degrees and E/W -> east positive, west negative.
fn magnetic_variation(value: &str, dir: &str) -> Result<Option<f64>, String> {
    let v = match number(value, "magnetic variation")? {
        Some(v) => v,
        None => return Ok(None),
    };
    match dir {
        "E" => Ok(Some(v)),
        "W" => Ok(Some(-v)),
        _ => Err(format!("magnetic variation {:?} needs E or W, got {:?}", value, dir)),
    }
}

fn gll(f: &[&str], p: &mut Points) -> Result<(), String> {
    need(f, 4, "GLL")?;
    let lat = coordinate(f[0], f[1], "latitude", 90.0, "S", "N")?;
    let lon = coordinate(f[2], f[3], "longitude", 180.0, "W", "E")?;
    let q = match f.get(5) {
        Some(s) if !s.is_empty() => worse(status(s, "GLL status")?, mode_quality(f, 6)),
        _ => Quality::Good,
    };
    p.f("latitude", lat, "°", q);
    p.f("longitude", lon, "°", q);
    Ok(())
}

fn vtg(f: &[&str], p: &mut Points) -> Result<(), String> {
    need(f, 8, "VTG")?;
    for (i, letter) in [(1, "T"), (3, "M"), (5, "N"), (7, "K")] {
        if !f[i].is_empty() && f[i] != letter {
            return Err(format!(
                "VTG field {} must be {:?}, got {:?} (the NMEA 1.x layout without unit letters is not supported)",
                i + 1,
                letter,
                f[i]
            ));
        }
    }
    let q = mode_quality(f, 8);
    p.f("course", number(f[0], "course (true)")?, "°", q);
    p.f("course_magnetic", number(f[2], "course (magnetic)")?, "°", q);
    p.f("speed_kn", number(f[4], "speed (knots)")?, "kn", q);
    p.f("speed_kmh", number(f[6], "speed (km/h)")?, "km/h", q);
    Ok(())
}

fn hdt(f: &[&str], p: &mut Points) -> Result<(), String> {
    need(f, 2, "HDT")?;
    p.f("heading", number(f[0], "heading")?, "°", Quality::Good);
    Ok(())
}

fn mtw(f: &[&str], p: &mut Points) -> Result<(), String> {
    need(f, 2, "MTW")?;
    let t = number(f[0], "water temperature")?;
    if t.is_some() && f[1] != "C" {
        return Err(format!("water temperature unit must be C, got {:?}", f[1]));
    }
    p.f("water_temperature", t, "°C", Quality::Good);
    Ok(())
}

fn mwv(f: &[&str], p: &mut Points) -> Result<(), String> {
    need(f, 5, "MWV")?;
    let q = status(f[4], "MWV status")?;
    let (angle_name, speed_name) = match f[1] {
        "R" => ("wind_angle", "wind_speed"),
        "T" => ("true_wind_angle", "true_wind_speed"),
        other => return Err(format!("MWV reference must be R (relative) or T (true), got {:?}", other)),
    };
    let speed = number(f[2], "wind speed")?;
    let unit = match (speed, f[3]) {
        (None, _) => "",
        (Some(_), "K") => "km/h",
        (Some(_), "M") => "m/s",
        (Some(_), "N") => "kn",
        (Some(_), "S") => "mph",
        (Some(_), other) => return Err(format!("wind speed unit must be K, M, N or S, got {:?}", other)),
    };
    p.f(angle_name, number(f[0], "wind angle")?, "°", q);
    p.f(speed_name, speed, unit, q);
    Ok(())
}

/// XDR unit letter -> unit (the transducer type tells % from Pa for "P").
fn xdr_unit(ty: &str, unit: &str) -> &'static str {
    match (ty, unit) {
        (_, "") => "",
        (_, "C") => "°C",
        (_, "B") => "bar",
        ("H", "P") => "%",
        (_, "P") => "Pa",
        (_, "D") => "°",
        (_, "V") => "V",
        (_, "A") => "A",
        (_, "M") => "m",
        (_, "H") => "Hz",
        (_, "R") => "rpm",
        (_, "K") => "K",
        (_, "L") => "L",
        (_, "N") => "N",
        _ => "?",
    }
}

/// A transducer name as a measurement name usable in rules: [A-Za-z0-9_], not starting with
/// a digit; no name -> xdr_<group>.
fn xdr_name(name: &str, group: usize) -> String {
    if name.is_empty() {
        return format!("xdr_{}", group);
    }
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if clean.as_bytes()[0].is_ascii_digit() {
        format!("xdr_{}", clean)
    } else {
        clean
    }
}

fn xdr(f: &[&str], p: &mut Points) -> Result<(), String> {
    if f.is_empty() || f.len() % 4 != 0 {
        return Err(format!(
            "XDR fields come in groups of four (type, value, unit, name), got {} fields",
            f.len()
        ));
    }
    for (g, q) in f.chunks(4).enumerate() {
        let (ty, value, unit, name) = (q[0], q[1], q[2], q[3]);
        let what = format!("XDR value of {:?}", name);
        let v = number(value, &what)?;
        let u = xdr_unit(ty, unit);
        if v.is_some() && u == "?" {
            return Err(format!("XDR unit {:?} of {:?} is not one this plugin knows", unit, name));
        }
        p.f(&xdr_name(name, g), v, u, Quality::Good);
    }
    Ok(())
}

// --- framing of a sentence ----------------------------------------------------------------------

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// A sentence -> its measurements (None: a type this config does not emit).
fn decode(c: &Config, s: &str) -> Result<Option<Points>, String> {
    if !s.starts_with('$') && !s.starts_with('!') {
        return Err(format!("not an NMEA sentence (it does not start with '$'): {}", excerpt(s)));
    }
    let (body, checksum) = match s.rfind('*') {
        Some(star) => (&s[1..star], Some(&s[star + 1..])),
        None => (&s[1..], None),
    };
    match checksum {
        Some(hh) => {
            let b = hh.as_bytes();
            let want = match (b.len(), b.first().and_then(|&x| hex_digit(x)), b.get(1).and_then(|&x| hex_digit(x))) {
                (2, Some(hi), Some(lo)) => hi << 4 | lo,
                _ => return Err(format!("checksum {:?} is not two hex digits: {}", hh, excerpt(s))),
            };
            let got = body.bytes().fold(0u8, |acc, x| acc ^ x);
            if got != want {
                return Err(format!(
                    "checksum mismatch: the sentence says {:02X}, its content gives {:02X}: {}",
                    want,
                    got,
                    excerpt(s)
                ));
            }
        }
        None if c.require_checksum => {
            return Err(format!(
                "no checksum (*hh) at the end: {} (set require_checksum = false for devices that send none)",
                excerpt(s)
            ))
        }
        None => {}
    }
    let mut fields = body.split(',');
    let address = fields.next().unwrap_or("");
    let f: Vec<&str> = fields.collect();
    let ty = if address.starts_with('P') {
        address // proprietary: P + manufacturer + type, never decoded
    } else if address.len() == 5 && address.bytes().all(|x| x.is_ascii_uppercase() || x.is_ascii_digit()) {
        &address[2..] // the talker id (GP, GN, II, ...) does not matter
    } else {
        return Err(format!(
            "address field {:?} is not a talker id and a sentence type (like GPGGA): {}",
            address,
            excerpt(s)
        ));
    };
    // '!' starts an encapsulated sentence (AIS VDM/VDO ...): never decoded here
    if s.starts_with('!') || !KNOWN.contains(&ty) {
        return match c.unknown {
            Unknown::Skip => Ok(None),
            Unknown::Error => Err(format!(
                "sentence type {} ({}{}) is not decoded (decoded: {}); set unknown = \"skip\" to ignore it",
                ty,
                &s[..1],
                address,
                KNOWN.join(", ")
            )),
        };
    }
    if !c.sentences.contains(&ty) {
        return Ok(None);
    }
    let mut p = Points::default();
    let result = match ty {
        "GGA" => gga(&f, &mut p),
        "RMC" => rmc(&f, &mut p),
        "GLL" => gll(&f, &mut p),
        "VTG" => vtg(&f, &mut p),
        "HDT" => hdt(&f, &mut p),
        "MTW" => mtw(&f, &mut p),
        "MWV" => mwv(&f, &mut p),
        _ => xdr(&f, &mut p),
    };
    result.map_err(|e| format!("{}: {}", address, e))?;
    Ok(Some(p))
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

fn process(c: &mut Config, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind != KIND_BYTES {
        return Err(format!(
            "expected a sentence as bytes (kind 0), got kind {} ({}): put nmea0183 first in the chain of a serial source",
            m.kind,
            m.kind_name()
        ));
    }
    let line = trim(m.payload);
    if line.is_empty() {
        return Ok(()); // a blank line is no sentence and no error
    }
    if let Some(pos) = line.iter().position(|c| !c.is_ascii() || (c.is_ascii_control() && *c != b'\t')) {
        return Err(format!(
            "not an NMEA sentence: byte 0x{:02X} at position {} is not printable ASCII (noise on the line, or a wrong baud rate?)",
            line[pos], pos
        ));
    }
    // checked above: printable ASCII is valid UTF-8
    let s = core::str::from_utf8(line).map_err(|e| e.to_string())?;
    let points = match decode(c, s)? {
        Some(p) => p,
        None => return Ok(()),
    };
    for pt in &points.0 {
        match pt.value {
            Val::F(v) => out.measurement_ex(&pt.name, v, pt.unit, pt.quality, None, None),
            Val::I(v) => out.measurement_ex(&pt.name, v, pt.unit, pt.quality, None, None),
            Val::B(v) => out.measurement_ex(&pt.name, v, pt.unit, pt.quality, None, None),
        }
    }
    Ok(())
}

flux_plugin! { state: Config, init_json: init, process: process }
