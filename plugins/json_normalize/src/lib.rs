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

/// A piece of a name template: `power_{index}` -> Lit("power_"), Index.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    /// `{index}`: the element's 0-based index (in `each`)
    Index,
    /// `{n}`: the element's 1-based number (in `each`)
    N,
    /// `{key}`: the member's key when `each` iterates an object (else the index)
    Key,
    /// `{name}`: the string at the field's `name_path`
    Name,
}

fn parse_template(text: &str, in_each: bool, has_name_path: bool) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        lit.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| format!("name {:?}: unclosed {{", text))? + open;
        let piece = match &rest[open + 1..close] {
            "index" if in_each => Piece::Index,
            "n" if in_each => Piece::N,
            "key" if in_each => Piece::Key,
            "name" if has_name_path => Piece::Name,
            "index" | "n" | "key" => return Err(format!("name {:?}: {{{}}} is only known inside each", text, &rest[open + 1..close])),
            "name" => return Err(format!("name {:?}: {{name}} needs name_path", text)),
            other => return Err(format!("name {:?}: unknown placeholder {{{}}} (known: index, n, key, name)", text, other)),
        };
        if !lit.is_empty() {
            pieces.push(Piece::Lit(core::mem::take(&mut lit)));
        }
        pieces.push(piece);
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("name {:?}: unmatched }}", text));
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

/// A value a map turns a reading into.
#[derive(Debug, Clone, PartialEq)]
enum Mapped {
    Num(f64),
    Bool(bool),
    Str(String),
}

impl Mapped {
    fn of(v: &Json) -> Result<Mapped, String> {
        match v {
            Json::Bool(b) => Ok(Mapped::Bool(*b)),
            Json::String(s) => Ok(Mapped::Str(s.clone())),
            Json::Number(n) => n.as_f64().filter(|x| x.is_finite()).map(Mapped::Num).ok_or_else(|| format!("{} is not a finite number", n)),
            other => Err(format!("a map value must be a number, bool or string, got {}", other)),
        }
    }

    fn value(&self) -> Value<'_> {
        match self {
            Mapped::Num(x) => Value::F64(*x),
            Mapped::Bool(b) => Value::Bool(*b),
            Mapped::Str(s) => Value::Str(s),
        }
    }
}

enum Name {
    /// name and unit known at init, turned into JSON once for every output line
    Fixed(Key),
    Dynamic { template: Vec<Piece>, unit: String },
}

struct Field {
    path: Path,
    /// for messages: the name template as written (or the default)
    label: String,
    name: Name,
    name_path: Option<Path>,
    unit_path: Option<Path>,
    scale: f64,
    offset: f64,
    required: bool,
    map: Vec<(String, Mapped)>,
    map_default: Option<Mapped>,
}

/// `each`: one set of fields per element of an array or member of an object.
struct Each {
    path: Path,
    fields: Vec<Field>,
    device_path: Option<Path>,
    ts_path: Option<Path>,
}

#[derive(Clone, Copy, PartialEq)]
enum TsUnit {
    Auto,
    Seconds,
    Millis,
    Micros,
    Iso,
}

pub struct Normalizer {
    fields: Vec<Field>,
    each: Vec<Each>,
    device_path: Option<Path>,
    ts_path: Option<Path>,
    ts_unit: TsUnit,
    keep: Vec<String>,
    drop: Vec<String>,
    /// The scanner's table of top-level members, reused from message to message.
    members: Vec<scan::Member>,
}

const FIELD_KEYS: &str = "path, name, unit, scale, offset, required, name_path, unit_path, map, map_default";
const EACH_KEYS: &str = "path, fields, device_path, ts_path";

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

/// A path that may be `.`: the element (or document) itself.
fn element_path(text: &str) -> Result<Path, String> {
    if text == "." {
        Ok(Path { text: ".".to_string(), steps: Vec::new() })
    } else {
        Path::parse(text)
    }
}

fn optional_path(obj: &Map<String, Json>, key: &str) -> Result<Option<Path>, String> {
    match string(obj, key)? {
        Some(p) => Path::parse(p).map(Some).map_err(|e| format!("{}: {}", key, e)),
        None => Ok(None),
    }
}

/// `*` matches any run of characters, `?` one character.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

fn patterns(cfg: &Map<String, Json>, key: &str) -> Result<Vec<String>, String> {
    match cfg.get(key) {
        None => Ok(Vec::new()),
        Some(Json::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| format!("{} must be a list of name patterns, got {}", key, v)))
            .collect(),
        Some(v) => Err(format!("{} must be a list of name patterns, got {}", key, v)),
    }
}

fn parse_field(obj: &Map<String, Json>, in_each: bool) -> Result<Field, String> {
    if let Some(k) = obj.keys().find(|k| !FIELD_KEYS.split(", ").any(|f| f == k.as_str())) {
        return Err(format!("unknown key {:?} (expected {})", k, FIELD_KEYS));
    }
    let path_text = string(obj, "path")?.ok_or("path is missing")?;
    let path = if in_each { element_path(path_text)? } else { Path::parse(path_text)? };
    let name_path = optional_path(obj, "name_path")?;
    let unit_path = optional_path(obj, "unit_path")?;
    let label = match string(obj, "name")? {
        Some(n) if !n.is_empty() => n.to_string(),
        Some(_) => return Err("name is empty".to_string()),
        None if name_path.is_some() => "{name}".to_string(),
        None if in_each && path.steps.is_empty() => "{key}".to_string(),
        None => path.last_key().ok_or("name is missing and the path ends in no key")?.to_string(),
    };
    let template = parse_template(&label, in_each, name_path.is_some())?;
    let required = match obj.get("required") {
        None => false,
        Some(Json::Bool(b)) => *b,
        Some(v) => return Err(format!("required must be true or false, got {}", v)),
    };
    let unit = string(obj, "unit")?.unwrap_or("");
    let map = match obj.get("map") {
        None => Vec::new(),
        Some(Json::Object(m)) if !m.is_empty() => {
            let mut out = Vec::with_capacity(m.len());
            for (k, v) in m {
                out.push((k.clone(), Mapped::of(v).map_err(|e| format!("map.{}: {}", k, e))?));
            }
            out
        }
        Some(v) => return Err(format!("map must be a non-empty table like {{ ON = true, OFF = false }}, got {}", v)),
    };
    let map_default = match obj.get("map_default") {
        None => None,
        Some(_) if map.is_empty() => return Err("map_default needs a map".to_string()),
        Some(v) => Some(Mapped::of(v).map_err(|e| format!("map_default: {}", e))?),
    };
    let fixed = template.iter().all(|p| matches!(p, Piece::Lit(_))) && unit_path.is_none();
    let name = if fixed { Name::Fixed(Key::new(&label, unit)) } else { Name::Dynamic { template, unit: unit.to_string() } };
    Ok(Field {
        path,
        label,
        name,
        name_path,
        unit_path,
        scale: number(obj, "scale", 1.0)?,
        offset: number(obj, "offset", 0.0)?,
        required,
        map,
        map_default,
    })
}

fn parse_fields(list: Option<&Json>, in_each: bool, at: &str, problems: &mut Vec<String>) -> Vec<Field> {
    let list = match list {
        None => return Vec::new(),
        Some(Json::Array(a)) => a,
        Some(_) => {
            problems.push(format!("{}fields must be a list of tables", at));
            return Vec::new();
        }
    };
    let mut fields = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        match item.as_object().ok_or_else(|| format!("must be a table, got {}", item)).and_then(|o| parse_field(o, in_each)) {
            Ok(f) => fields.push(f),
            Err(e) => problems.push(format!("{}fields[{}]: {}", at, i, e)),
        }
    }
    fields
}

fn parse_each(obj: &Map<String, Json>, at: &str, problems: &mut Vec<String>) -> Option<Each> {
    if let Some(k) = obj.keys().find(|k| !EACH_KEYS.split(", ").any(|f| f == k.as_str())) {
        problems.push(format!("{}: unknown key {:?} (expected {})", at, k, EACH_KEYS));
        return None;
    }
    let path = match string(obj, "path").and_then(|p| element_path(p.ok_or("path is missing")?)) {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!("{}: {}", at, e));
            return None;
        }
    };
    let fields = parse_fields(obj.get("fields"), true, &format!("{}.", at), problems);
    if fields.is_empty() && obj.get("fields").map_or(true, |f| f.as_array().map_or(false, |a| a.is_empty())) {
        problems.push(format!("{}: fields is missing or empty: give the fields of each element", at));
    }
    let mut paths = [None, None];
    for (slot, key) in paths.iter_mut().zip(["device_path", "ts_path"]) {
        match string(obj, key).and_then(|p| p.map(element_path).transpose()) {
            Ok(p) => *slot = p,
            Err(e) => problems.push(format!("{}.{}: {}", at, key, e)),
        }
    }
    let [device_path, ts_path] = paths;
    Some(Each { path, fields, device_path, ts_path })
}

fn init(cfg: &Json) -> Result<Normalizer, String> {
    let cfg = cfg.as_object().ok_or("config must be a JSON object")?;
    let mut problems = Vec::new();
    let mut fields = parse_fields(cfg.get("fields"), false, "", &mut problems);
    let mut each = Vec::new();
    match cfg.get("each") {
        None => {}
        Some(Json::Array(list)) => {
            for (i, item) in list.iter().enumerate() {
                match item.as_object() {
                    Some(o) => each.extend(parse_each(o, &format!("each[{}]", i), &mut problems)),
                    None => problems.push(format!("each[{}]: must be a table, got {}", i, item)),
                }
            }
        }
        Some(_) => problems.push("each must be a list of tables".to_string()),
    }
    if problems.is_empty() && fields.is_empty() && each.is_empty() {
        return Err("fields and each are missing or empty: give a list like fields = [{ path = \"data.temp\", name = \"temperature\" }]".to_string());
    }
    let take = |key: &str, problems: &mut Vec<String>| optional_path(cfg, key).unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let device_path = take("device_path", &mut problems);
    let ts_path = take("ts_path", &mut problems);
    let ts_unit = match string(cfg, "ts_unit") {
        Ok(None) | Ok(Some("auto")) => TsUnit::Auto,
        Ok(Some("s")) => TsUnit::Seconds,
        Ok(Some("ms")) => TsUnit::Millis,
        Ok(Some("us")) => TsUnit::Micros,
        Ok(Some("iso8601")) => TsUnit::Iso,
        Ok(Some(other)) => {
            problems.push(format!("ts_unit must be \"auto\", \"s\", \"ms\", \"us\" or \"iso8601\", got {:?}", other));
            TsUnit::Auto
        }
        Err(e) => {
            problems.push(e);
            TsUnit::Auto
        }
    };
    let keep = patterns(cfg, "keep").unwrap_or_else(|e| {
        problems.push(e);
        Vec::new()
    });
    let drop = patterns(cfg, "drop").unwrap_or_else(|e| {
        problems.push(e);
        Vec::new()
    });
    if !problems.is_empty() {
        return Err(format!("invalid config: {}", problems.join("; ")));
    }
    let mut n = Normalizer { fields: Vec::new(), each: Vec::new(), device_path, ts_path, ts_unit, keep, drop, members: Vec::new() };
    // Fields whose fixed name the filters refuse are never read.
    fields.retain(|f| !matches!(&f.name, Name::Fixed(k) if !n.wanted(k.name())));
    for e in &mut each {
        e.fields.retain(|f| !matches!(&f.name, Name::Fixed(k) if !n.wanted(k.name())));
    }
    n.fields = fields;
    n.each = each;
    Ok(n)
}

impl Normalizer {
    /// Whether the keep/drop filters let a measurement of this name through.
    fn wanted(&self, name: &str) -> bool {
        (self.keep.is_empty() || self.keep.iter().any(|p| glob(p, name))) && !self.drop.iter().any(|p| glob(p, name))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of an ISO 8601 / RFC 3339 date-time: `2024-03-01T12:30:00Z`,
/// `2024-03-01 12:30:00.250+01:00`, `20240301T123000Z`, `2024-03-01` (midnight). Without an
/// offset the time is read as UTC.
fn parse_iso8601(text: &str) -> Result<f64, String> {
    let bad = |why: &str| format!("{:?} is not an ISO 8601 date-time ({})", text, why);
    let b = text.trim().as_bytes();
    let mut p = 0;
    let num = |p: &mut usize, n: usize, what: &str| -> Result<i64, String> {
        let s = b
            .get(*p..*p + n)
            .filter(|s| s.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| bad(&format!("expected {} digits of the {} at character {}", n, what, *p)))?;
        *p += n;
        Ok(s.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
    };
    let year = num(&mut p, 4, "year")?;
    let extended = b.get(p) == Some(&b'-');
    if extended {
        p += 1;
    }
    let month = num(&mut p, 2, "month")?;
    if extended && b.get(p) != Some(&b'-') {
        return Err(bad("expected - after the month"));
    }
    if extended {
        p += 1;
    }
    let day = num(&mut p, 2, "day")?;
    if !(1..=12).contains(&month) || day < 1 || day > [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][(month - 1) as usize] {
        return Err(bad("no such date"));
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if month == 2 && day == 29 && !leap {
        return Err(bad("no such date"));
    }
    let mut secs = days_from_civil(year, month, day) as f64 * 86_400.0;
    if p == b.len() {
        return Ok(secs);
    }
    if !matches!(b[p], b'T' | b't' | b' ') {
        return Err(bad("expected T between date and time"));
    }
    p += 1;
    let hour = num(&mut p, 2, "hour")?;
    let colon = extended && b.get(p) == Some(&b':');
    if extended && !colon {
        return Err(bad("expected : after the hour"));
    }
    if colon {
        p += 1;
    }
    let minute = num(&mut p, 2, "minute")?;
    let mut second = 0;
    if colon && b.get(p) == Some(&b':') {
        p += 1;
        second = num(&mut p, 2, "second")?;
    } else if !colon && b.get(p).map_or(false, u8::is_ascii_digit) {
        second = num(&mut p, 2, "second")?;
    }
    if hour > 24 || minute > 59 || second > 60 || (hour == 24 && (minute, second) != (0, 0)) {
        return Err(bad("time out of range"));
    }
    let mut frac = 0.0;
    if matches!(b.get(p), Some(b'.' | b',')) {
        p += 1;
        let start = p;
        let mut scale = 0.1;
        while p < b.len() && b[p].is_ascii_digit() {
            frac += f64::from(b[p] - b'0') * scale;
            scale /= 10.0;
            p += 1;
        }
        if p == start {
            return Err(bad("no digits after the decimal point"));
        }
    }
    secs += (hour * 3600 + minute * 60 + second) as f64 + frac;
    match b.get(p) {
        None => Ok(secs),
        Some(b'Z' | b'z') if p + 1 == b.len() => Ok(secs),
        Some(&sign @ (b'+' | b'-')) => {
            p += 1;
            let oh = num(&mut p, 2, "offset hours")?;
            if b.get(p) == Some(&b':') {
                p += 1;
            }
            let om = if p < b.len() { num(&mut p, 2, "offset minutes")? } else { 0 };
            if p != b.len() || oh > 23 || om > 59 {
                return Err(bad("bad offset"));
            }
            let off = (oh * 3600 + om * 60) as f64;
            Ok(if sign == b'+' { secs - off } else { secs + off })
        }
        Some(_) => Err(bad("unexpected text after the time")),
    }
}

/// Unix seconds from a timestamp value.
fn timestamp(unit: TsUnit, path: &Path, v: Val<'_>) -> Result<f64, String> {
    match (v, unit) {
        (Val::Num(t), TsUnit::Seconds) => Ok(t),
        (Val::Num(t), TsUnit::Millis) => Ok(t / 1e3),
        (Val::Num(t), TsUnit::Micros) => Ok(t / 1e6),
        // 1e11 s is the year 5138, 1e11 ms 1973; 1e14 ms is the year 5138, 1e14 µs 1973.
        (Val::Num(t), TsUnit::Auto) => Ok(if t.abs() >= 1e14 {
            t / 1e6
        } else if t.abs() >= 1e11 {
            t / 1e3
        } else {
            t
        }),
        (Val::Str(s), TsUnit::Auto | TsUnit::Iso) => parse_iso8601(s).map_err(|e| format!("ts_path {}: {}", path.text, e)),
        (Val::Num(_), TsUnit::Iso) => Err(format!("ts_path {} is a number, expected an ISO 8601 string (ts_unit = \"iso8601\")", path.text)),
        (v, _) => Err(format!("ts_path {} is {}, expected unix seconds, milliseconds or microseconds, or an ISO 8601 string", path.text, v.kind())),
    }
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

/// A value found at a path, whichever parser found it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Val<'a> {
    Num(f64),
    /// A number `as_f64` cannot give (only with serde_json's arbitrary_precision).
    BadNum(&'a serde_json::Number),
    Bool(bool),
    Str(&'a str),
    Array,
    Object,
}

impl<'a> Val<'a> {
    fn of(v: &'a Json) -> Option<Val<'a>> {
        Some(match v {
            Json::Null => return None,
            Json::Bool(b) => Val::Bool(*b),
            Json::Number(n) => n.as_f64().map_or(Val::BadNum(n), Val::Num),
            Json::String(s) => Val::Str(s),
            Json::Array(_) => Val::Array,
            Json::Object(_) => Val::Object,
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Val::Num(_) | Val::BadNum(_) => "a number",
            Val::Bool(_) => "a bool",
            Val::Str(_) => "a string",
            Val::Array => "an array",
            Val::Object => "an object",
        }
    }
}

/// The fast path met something only the serde_json path renders exactly (a numeric device id),
/// or a config the scanner does not serve (`each`): nothing has been written yet, so the message
/// is processed again that way.
struct Redo;

/// Where a field is read: the document, or one element of an `each`.
#[derive(Clone, Copy)]
struct Ctx<'k> {
    index: usize,
    key: Option<&'k str>,
}

/// The string at a name or unit path (a number is written as JSON writes it).
fn text_at<'d>(get: &dyn Fn(&Path) -> Option<Val<'d>>, p: &Path) -> Result<Option<String>, String> {
    match get(p) {
        None => Ok(None),
        Some(Val::Str(s)) => Ok(Some(s.to_string())),
        Some(Val::Num(x)) if x.fract() == 0.0 && x.abs() < 1e15 => Ok(Some(format!("{}", x as i64))),
        Some(v) => Err(format!("{} is {}, expected a string", p.text, v.kind())),
    }
}

/// Emits one measurement per field found through `get`.
fn emit<'d>(
    n: &Normalizer,
    fields: &[Field],
    get: &dyn Fn(&Path) -> Option<Val<'d>>,
    ctx: Option<Ctx<'_>>,
    device: Option<&str>,
    ts: Option<f64>,
    out: &mut Output,
) {
    let at = |f: &Field| match ctx {
        None => format!("field {:?} (path {})", f.label, f.path.text),
        Some(Ctx { key: Some(k), .. }) => format!("field {:?} (path {}) of element {:?}", f.label, f.path.text, k),
        Some(Ctx { index, .. }) => format!("field {:?} (path {}) of element {}", f.label, f.path.text, index),
    };
    for f in fields {
        let v = match get(&f.path) {
            Some(v) => v,
            None if f.required => {
                out.error(format_args!("required {} is missing", at(f)));
                continue;
            }
            None => continue,
        };
        let mapped = if f.map.is_empty() {
            None
        } else {
            let text = match v {
                Val::Str(s) => Some(s.to_string()),
                Val::Bool(b) => Some(if b { "true" } else { "false" }.to_string()),
                Val::Num(x) if x.fract() == 0.0 && x.abs() < 1e15 => Some(format!("{}", x as i64)),
                _ => None,
            };
            match text.as_deref().and_then(|t| f.map.iter().find(|(k, _)| k == t)).map(|(_, m)| m).or(f.map_default.as_ref()) {
                Some(m) => Some(m),
                None => {
                    let known: Vec<&str> = f.map.iter().map(|(k, _)| k.as_str()).collect();
                    let shown = text.map_or_else(|| v.kind().to_string(), |t| format!("{:?}", t));
                    out.error(format_args!("{}: value {} is not in its map ({}); add it, or set map_default", at(f), shown, known.join(", ")));
                    continue;
                }
            }
        };
        let value = match (mapped, v) {
            (Some(m), _) => m.value(),
            (None, Val::Num(x)) => Value::F64(x * f.scale + f.offset),
            (None, Val::BadNum(x)) => {
                out.error(format_args!("{}: {} is not representable", at(f), x));
                continue;
            }
            (None, Val::Bool(b)) => Value::Bool(b),
            (None, Val::Str(s)) => Value::Str(s),
            (None, other) => {
                out.error(format_args!("{} is {}, expected a number, bool or string", at(f), other.kind()));
                continue;
            }
        };
        match &f.name {
            Name::Fixed(key) => out.put_ex(key, value, device, ts),
            Name::Dynamic { template, unit } => {
                let data_name = match f.name_path.as_ref().map(|p| text_at(get, p)) {
                    None => None,
                    Some(Ok(Some(s))) if !s.is_empty() => Some(s),
                    Some(Ok(_)) => {
                        out.error(format_args!("{}: name_path {} is missing or empty", at(f), f.name_path.as_ref().map_or("", |p| p.text.as_str())));
                        continue;
                    }
                    Some(Err(e)) => {
                        out.error(format_args!("{}: name_path {}", at(f), e));
                        continue;
                    }
                };
                let mut name = String::new();
                for piece in template {
                    match piece {
                        Piece::Lit(s) => name.push_str(s),
                        Piece::Index => name.push_str(&ctx.map_or(0, |c| c.index).to_string()),
                        Piece::N => name.push_str(&ctx.map_or(1, |c| c.index + 1).to_string()),
                        Piece::Key => match ctx.and_then(|c| c.key) {
                            Some(k) => name.push_str(k),
                            None => name.push_str(&ctx.map_or(0, |c| c.index).to_string()),
                        },
                        Piece::Name => name.push_str(data_name.as_deref().unwrap_or("")),
                    }
                }
                if !n.wanted(&name) {
                    continue;
                }
                let data_unit = match f.unit_path.as_ref().map(|p| text_at(get, p)) {
                    Some(Ok(Some(u))) => Some(u),
                    None | Some(Ok(None)) => None,
                    Some(Err(e)) => {
                        out.error(format_args!("{}: unit_path {}", at(f), e));
                        continue;
                    }
                };
                let unit = data_unit.as_deref().unwrap_or(unit);
                out.measurement_ex(&name, value, unit, Quality::Good, device, ts);
            }
        }
    }
}

/// The message's device from `device_path`: Ok(None) when absent.
fn device_at<'d>(
    get: &dyn Fn(&Path) -> Option<Val<'d>>,
    device_number: &dyn Fn(&Path) -> Option<String>,
    p: Option<&Path>,
) -> Result<Result<Option<String>, String>, Redo> {
    Ok(match p.map(|p| (p, get(p))) {
        None | Some((_, None)) => Ok(None),
        Some((_, Some(Val::Str(s)))) => Ok(Some(s.to_string())),
        Some((p, Some(Val::Num(_) | Val::BadNum(_)))) => Ok(Some(device_number(p).ok_or(Redo)?)),
        Some((p, Some(v))) => Err(format!("device_path {} is {}, expected a string", p.text, v.kind())),
    })
}

/// Normalizes one document's top-level fields; `get` finds the (non-null) value at a path.
fn normalize<'d>(
    n: &Normalizer,
    get: &dyn Fn(&Path) -> Option<Val<'d>>,
    device_number: &dyn Fn(&Path) -> Option<String>,
    out: &mut Output,
) -> Result<Result<(Option<String>, Option<f64>), String>, Redo> {
    let ts = match n.ts_path.as_ref().and_then(|p| get(p).map(|v| (p, v))) {
        None => None,
        Some((p, v)) => match timestamp(n.ts_unit, p, v) {
            Ok(t) => Some(t),
            Err(e) => return Ok(Err(e)),
        },
    };
    let device = match device_at(get, device_number, n.device_path.as_ref())? {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    emit(n, &n.fields, get, None, device.as_deref(), ts, out);
    Ok(Ok((device, ts)))
}

fn process(n: &mut Normalizer, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind == KIND_REGISTERS {
        return Err("expected a JSON payload (kind 0 or 2), got register words (kind 1)".to_string());
    }
    if !n.each.is_empty() {
        return process_tree(n, m, out);
    }
    // Fast path: a document the scanner accepts is read in place, without building a tree.
    let mut members = core::mem::take(&mut n.members);
    let done = match scan::Doc::new(m.payload, &mut members) {
        Some(doc) => normalize(n, &|p| doc.get(&p.steps), &|_| None, out).ok().map(|r| r.map(|_| ())),
        None => None,
    };
    n.members = members;
    match done {
        Some(r) => r,
        None => process_tree(n, m, out),
    }
}

/// The reference path: serde_json builds the document; its errors are the ones reported.
fn process_tree(n: &Normalizer, m: &Message, out: &mut Output) -> Result<(), String> {
    let doc: Json = serde_json::from_slice(m.payload).map_err(|e| json_error(m.payload, &e))?;
    let device_number = |p: &Path| p.get(&doc).map(|v| v.to_string());
    let (device, ts) = match normalize(n, &|p| p.get(&doc).and_then(Val::of), &device_number, out) {
        Ok(r) => r?,
        Err(Redo) => unreachable!("the tree path renders numeric devices itself"),
    };
    for e in &n.each {
        let container = if e.path.steps.is_empty() { Some(&doc) } else { e.path.get(&doc) };
        let elements: Vec<(Option<&str>, &Json)> = match container {
            None => continue,
            Some(Json::Array(a)) => a.iter().map(|v| (None, v)).collect(),
            Some(Json::Object(o)) => o.iter().map(|(k, v)| (Some(k.as_str()), v)).collect(),
            Some(other) => {
                out.error(format_args!("each {}: {} is {}, expected an array or an object", e.path.text, e.path.text, Val::of(other).map_or("null", |v| v.kind())));
                continue;
            }
        };
        for (index, (key, elem)) in elements.into_iter().enumerate() {
            let get = |p: &Path| if p.steps.is_empty() { Val::of(elem) } else { p.get(elem).and_then(Val::of) };
            let number = |p: &Path| p.get(elem).map(|v| v.to_string());
            let elem_device = match device_at(&get, &number, e.device_path.as_ref()) {
                Ok(Ok(d)) => d.or_else(|| device.clone()),
                Ok(Err(err)) => {
                    out.error(format_args!("each {} element {}: {}", e.path.text, index, err));
                    continue;
                }
                Err(Redo) => unreachable!("numbers are rendered here"),
            };
            let elem_ts = match e.ts_path.as_ref().and_then(|p| get(p).map(|v| (p, v))) {
                None => ts,
                Some((p, v)) => match timestamp(n.ts_unit, p, v) {
                    Ok(t) => Some(t),
                    Err(err) => {
                        out.error(format_args!("each {} element {}: {}", e.path.text, index, err));
                        continue;
                    }
                },
            };
            emit(n, &e.fields, &get, Some(Ctx { index, key }), elem_device.as_deref(), elem_ts, out);
        }
    }
    Ok(())
}

/// A JSON scanner that checks a document once and then finds values by path without building
/// a tree. It accepts a subset of what serde_json accepts and reads every value it accepts
/// the same way; anything else (escapes in strings, invalid JSON, numbers out of range, deep
/// nesting) makes [`Doc::new`] return `None` and serde_json takes over.
mod scan {
    use super::{Step, Val};
    use flux_plugin_sdk::serde_json;

    /// Deepest nesting the scanner takes (serde_json's own limit is 128).
    const MAX_DEPTH: u32 = 100;
    /// Integer parts longer than this may overflow f64: left to serde_json.
    const MAX_INT_DIGITS: usize = 300;

    /// A member of the top-level object: where its key's text starts and ends, and where its
    /// value starts.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Member {
        key: (u32, u32),
        value: u32,
    }

    pub(super) struct Doc<'a, 'm> {
        b: &'a [u8],
        root: usize,
        /// The top-level object's members, when the document is an object.
        members: &'m [Member],
    }

    fn ws(b: &[u8], mut p: usize) -> usize {
        while p < b.len() && matches!(b[p], b' ' | b'\n' | b'\r' | b'\t') {
            p += 1;
        }
        p
    }

    impl<'a, 'm> Doc<'a, 'm> {
        /// Checks `b`; `members` is scratch space for the table of top-level members.
        pub(super) fn new(b: &'a [u8], members: &'m mut Vec<Member>) -> Option<Doc<'a, 'm>> {
            core::str::from_utf8(b).ok()?;
            if b.len() > u32::MAX as usize {
                return None;
            }
            members.clear();
            let root = ws(b, 0);
            let end = if b.get(root) == Some(&b'{') { object(b, root, members)? } else { value(b, root, 0)? };
            if ws(b, end) != b.len() {
                return None;
            }
            Some(Doc { b, root, members })
        }

        /// The value at `steps` (`null` counts as missing), as serde_json's tree would give it.
        pub(super) fn get(&self, steps: &[Step]) -> Option<Val<'a>> {
            let b = self.b;
            let mut p = self.root;
            let mut rest = steps;
            if let (Some(Step::Key(k)), b'{') = (steps.first(), b[p]) {
                // Duplicate keys: the last one wins, as in serde_json's map.
                let k = k.as_bytes();
                let m = self.members.iter().rev().find(|m| &b[m.key.0 as usize..m.key.1 as usize] == k)?;
                p = m.value as usize;
                rest = &steps[1..];
            }
            for step in rest {
                p = match (step, b[p]) {
                    (Step::Key(k), b'{') => member(b, p, k.as_bytes())?,
                    (Step::Key(k), b'[') => element(b, p, k.parse::<usize>().ok()?)?,
                    (Step::Index(i), b'[') => element(b, p, *i)?,
                    _ => return None,
                };
            }
            Some(match b[p] {
                b'"' => {
                    let end = p + 1 + b[p + 1..].iter().position(|&c| c == b'"')?;
                    // The document is valid UTF-8 and quotes are ASCII: a char boundary.
                    Val::Str(core::str::from_utf8(&b[p + 1..end]).ok()?)
                }
                b't' => Val::Bool(true),
                b'f' => Val::Bool(false),
                b'n' => return None,
                b'{' => Val::Object,
                b'[' => Val::Array,
                _ => Val::Num(number_value(&b[p..skip(b, p)])?),
            })
        }
    }

    /// Checks the top-level object at `p`, noting its members; returns where it ends.
    fn object(b: &[u8], p: usize, members: &mut Vec<Member>) -> Option<usize> {
        let mut p = ws(b, p + 1);
        if b.get(p) == Some(&b'}') {
            return Some(p + 1);
        }
        loop {
            if b.get(p) != Some(&b'"') {
                return None;
            }
            let key_end = string(b, p)?;
            let key = (p as u32 + 1, key_end as u32 - 1);
            p = ws(b, key_end);
            if b.get(p) != Some(&b':') {
                return None;
            }
            let v = ws(b, p + 1);
            members.push(Member { key, value: v as u32 });
            p = ws(b, value(b, v, 1)?);
            match b.get(p) {
                Some(b',') => p = ws(b, p + 1),
                Some(b'}') => return Some(p + 1),
                _ => return None,
            }
        }
    }

    /// Checks the value at `p`; returns where it ends.
    fn value(b: &[u8], p: usize, depth: u32) -> Option<usize> {
        match *b.get(p)? {
            b'"' => string(b, p),
            b'{' | b'[' if depth >= MAX_DEPTH => None,
            b'{' => {
                let mut p = ws(b, p + 1);
                if b.get(p) == Some(&b'}') {
                    return Some(p + 1);
                }
                loop {
                    if b.get(p) != Some(&b'"') {
                        return None;
                    }
                    p = ws(b, string(b, p)?);
                    if b.get(p) != Some(&b':') {
                        return None;
                    }
                    p = ws(b, value(b, ws(b, p + 1), depth + 1)?);
                    match b.get(p) {
                        Some(b',') => p = ws(b, p + 1),
                        Some(b'}') => return Some(p + 1),
                        _ => return None,
                    }
                }
            }
            b'[' => {
                let mut p = ws(b, p + 1);
                if b.get(p) == Some(&b']') {
                    return Some(p + 1);
                }
                loop {
                    p = ws(b, value(b, p, depth + 1)?);
                    match b.get(p) {
                        Some(b',') => p = ws(b, p + 1),
                        Some(b']') => return Some(p + 1),
                        _ => return None,
                    }
                }
            }
            b't' => literal(b, p, b"true"),
            b'f' => literal(b, p, b"false"),
            b'n' => literal(b, p, b"null"),
            b'-' | b'0'..=b'9' => number(b, p),
            _ => None,
        }
    }

    fn literal(b: &[u8], p: usize, word: &[u8]) -> Option<usize> {
        if b.get(p..p + word.len())? == word {
            Some(p + word.len())
        } else {
            None
        }
    }

    /// A string without escapes or control characters.
    fn string(b: &[u8], p: usize) -> Option<usize> {
        let mut q = p + 1;
        loop {
            match *b.get(q)? {
                b'"' => return Some(q + 1),
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => q += 1,
            }
        }
    }

    fn digits(b: &[u8], mut p: usize) -> usize {
        while p < b.len() && b[p].is_ascii_digit() {
            p += 1;
        }
        p
    }

    /// A JSON number (RFC 8259 grammar) that is finite as an f64.
    fn number(b: &[u8], start: usize) -> Option<usize> {
        let mut p = start;
        if b[p] == b'-' {
            p += 1;
        }
        let int = p;
        match *b.get(p)? {
            b'0' => p += 1,
            b'1'..=b'9' => p = digits(b, p),
            _ => return None,
        }
        if p - int > MAX_INT_DIGITS {
            return None;
        }
        if b.get(p) == Some(&b'.') {
            let q = digits(b, p + 1);
            if q == p + 1 {
                return None;
            }
            p = q;
        }
        if matches!(b.get(p), Some(b'e' | b'E')) {
            p += 1;
            if matches!(b.get(p), Some(b'+' | b'-')) {
                p += 1;
            }
            let q = digits(b, p);
            if q == p {
                return None;
            }
            p = q;
            // serde_json refuses a number that overflows: so does the scanner.
            if !number_value(&b[start..p])?.is_finite() {
                return None;
            }
        }
        Some(p)
    }

    /// The f64 serde_json gives for a number's text: integers as u64/i64 converted to f64
    /// (`-0` is -0.0), everything else correctly rounded.
    fn number_value(text: &[u8]) -> Option<f64> {
        const POW10: [f64; 16] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15];
        let (neg, digits) = match text.first() {
            Some(b'-') => (true, &text[1..]),
            _ => (false, text),
        };
        let mut m: u64 = 0;
        let mut point = None;
        for (i, &d) in digits.iter().enumerate() {
            match d {
                b'0'..=b'9' => match m.checked_mul(10).and_then(|m| m.checked_add(u64::from(d - b'0'))) {
                    Some(x) => m = x,
                    None => return parse_slow(text),
                },
                b'.' => point = Some(i),
                _ => return parse_slow(text), // an exponent
            }
        }
        let v = match point {
            None => m as f64,
            // Up to 15 significant digits and 15 decimals: m and 10^k are exact, and one
            // correctly rounded division gives the correctly rounded value.
            Some(i) if m < 1_000_000_000_000_000 && digits.len() - i - 1 < POW10.len() => {
                m as f64 / POW10[digits.len() - i - 1]
            }
            Some(_) => return parse_slow(text),
        };
        Some(if neg { -v } else { v })
    }

    /// Any other number, through serde_json's own parser (`float_roundtrip`: correctly rounded)
    /// and the same conversion as the tree path (parsing a `Value` adds no code to the module).
    #[cold]
    fn parse_slow(text: &[u8]) -> Option<f64> {
        serde_json::from_slice::<serde_json::Value>(text).ok()?.as_f64()
    }

    /// Where a (valid) value starting at `p` ends.
    fn skip(b: &[u8], p: usize) -> usize {
        match b[p] {
            b'"' => p + 2 + b[p + 1..].iter().position(|&c| c == b'"').unwrap_or(b.len()),
            b'{' | b'[' => {
                let mut depth = 0u32;
                let mut q = p;
                while q < b.len() {
                    match b[q] {
                        b'"' => q += 1 + b[q + 1..].iter().position(|&c| c == b'"').unwrap_or(b.len()),
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return q + 1;
                            }
                        }
                        _ => {}
                    }
                    q += 1;
                }
                b.len()
            }
            b't' | b'n' => p + 4,
            b'f' => p + 5,
            _ => {
                let mut q = p;
                while q < b.len() && matches!(b[q], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    q += 1;
                }
                q
            }
        }
    }

    /// The value of the last member named `key` of the (valid) object at `p`.
    fn member(b: &[u8], p: usize, key: &[u8]) -> Option<usize> {
        let mut q = ws(b, p + 1);
        if b[q] == b'}' {
            return None;
        }
        let mut found = None;
        loop {
            let end = skip(b, q); // the key
            let name = &b[q + 1..end - 1];
            let v = ws(b, ws(b, end) + 1);
            if name == key {
                found = Some(v); // duplicate keys: the last one wins, as in serde_json's map
            }
            q = ws(b, skip(b, v));
            if b[q] == b',' {
                q = ws(b, q + 1);
            } else {
                return found;
            }
        }
    }

    /// Element `i` of the (valid) array at `p`.
    fn element(b: &[u8], p: usize, i: usize) -> Option<usize> {
        let mut q = ws(b, p + 1);
        if b[q] == b']' {
            return None;
        }
        let mut k = 0;
        loop {
            if k == i {
                return Some(q);
            }
            q = ws(b, skip(b, q));
            if b[q] == b',' {
                q = ws(b, q + 1);
                k += 1;
            } else {
                return None;
            }
        }
    }
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
    fn iso8601() {
        let ok = [
            ("1970-01-01T00:00:00Z", 0.0),
            ("2024-03-01T12:30:00Z", 1_709_296_200.0),
            ("2024-03-01T12:30:00.250+01:00", 1_709_292_600.25),
            ("2024-03-01 12:30:00-0530", 1_709_316_000.0),
            ("20240301T123000Z", 1_709_296_200.0),
            ("2024-02-29", 1_709_164_800.0),
            ("2000-01-01T00:00", 946_684_800.0),
            ("1969-12-31T23:59:59Z", -1.0),
        ];
        for (text, want) in ok {
            assert_eq!(parse_iso8601(text), Ok(want), "{}", text);
        }
        for bad in ["", "2024", "2023-02-29", "2024-13-01", "2024-03-01T25:00", "2024-03-01T12:30:00Zx", "2024-03-01X12", "2024-03-01T12:30:00+1", "yesterday"] {
            assert!(parse_iso8601(bad).is_err(), "{}", bad);
        }
    }

    #[test]
    fn globs() {
        for (p, n, want) in [("*", "", true), ("a*", "abc", true), ("*c", "abc", true), ("a?c", "abc", true), ("a*b*c", "axxbyyc", true), ("a*d", "abc", false), ("?", "", false), ("temp_*", "temp_", true), ("é*", "éa", true)] {
            assert_eq!(glob(p, n), want, "{} {}", p, n);
        }
    }

    fn normalizer() -> Normalizer {
        let paths = ["a", "a.b", "a[0]", "a.1", "b.c[1].d", "x", "t", "d", "u.v.w", "k[2][0]", "n"];
        let fields: Vec<Json> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| serde_json::json!({"path": p, "name": format!("f{}", i), "scale": 2.0, "required": i % 3 == 0}))
            .collect();
        init(&serde_json::json!({"fields": fields, "ts_path": "t", "device_path": "d"})).unwrap()
    }

    /// Output of the scanner path (None when it hands the document over) and of the tree path.
    fn both(n: &Normalizer, payload: &[u8]) -> (Option<String>, String) {
        let run = |f: &dyn Fn(&mut Output) -> Option<Result<(), String>>| {
            let mut buf = Vec::new();
            let r = {
                let mut out = Output::new(&mut buf, 3);
                let r = f(&mut out);
                if let Some(Err(e)) = &r {
                    out.error(e);
                }
                r
            };
            r.map(|_| String::from_utf8(buf).unwrap())
        };
        let mut members = Vec::new();
        let fast = scan::Doc::new(payload, &mut members)
            .and_then(|doc| run(&|out| normalize(n, &|p| doc.get(&p.steps), &|_| None, out).ok().map(|r| r.map(|_| ()))));
        let m = Message { index: 3, kind: 0, function: 0, address: 0, ts: 1.0, device: "d", topic: "", payload };
        let tree = run(&|out| Some(process_tree(n, &m, out))).unwrap();
        (fast, tree)
    }

    #[test]
    fn scanner_reads_documents_as_serde_json_does() {
        let n = normalizer();
        let taken = [
            r#"{"a": 1, "x": -0, "t": 1700000000123, "d": "dev"}"#,
            r#"{"a": {"b": 2.5e3, "b": true}, "x": "°C ok", "n": null}"#,
            r#"{"a": [7, 8, [9]], "b": {"c": [0, {"d": 1E-2}]}, "k": [0, 1, [["s"]]]}"#,
            r#"  {"u":{"v":{"w":18446744073709551616}},"x":-9223372036854775809,"t":1.5}  "#,
            r#"{"a": {"b": {}}, "x": [], "u": {"v": {"w": [1, {"}": "]["}]}}}"#,
            r#"{"x": 12345678901234567890123, "a": 0.1, "t": "late"}"#,
            r#"{"x": 4.9e-324, "a": 1.7976931348623157e308, "u": {"v": {"w": 1e-400}}}"#,
            r#"{"x": true, "a": false, "d": null, "t": null}"#,
            r#"{"d": ["x"], "a": 1}"#,
            r#"{"a": 1, "a": {"b": 2}}"#,
            "[1, 2, 3]",
            "17",
            "\t{\"a\"\r\n:\n1}\n",
        ];
        for doc in taken {
            let (fast, tree) = both(&n, doc.as_bytes());
            assert_eq!(fast.as_deref(), Some(tree.as_str()), "{}", doc);
        }
        let handed_over = [
            r#"{"x": "a\"b"}"#,
            "{\"x\": \"tab\there\"}",
            r#"{"x": 1e309}"#,
            r#"{"x": -1e400}"#,
            r#"{"x": 01}"#,
            r#"{"x": 1.}"#,
            r#"{"x": .5}"#,
            r#"{"x": 1,}"#,
            r#"{"x" 1}"#,
            r#"{"x": tru}"#,
            r#"{"x": 1} x"#,
            r#"{"d": 42, "a": 1}"#,
            "",
            "   ",
        ];
        for doc in handed_over {
            let (fast, tree) = both(&n, doc.as_bytes());
            assert_eq!(fast, None, "{:?} -> {}", doc, tree);
        }
        assert_eq!(both(&n, b"{\"x\": \"\xff\"}").0, None); // not UTF-8
        let deep = format!("{}{}", "[".repeat(150), "]".repeat(150));
        assert_eq!(both(&n, deep.as_bytes()).0, None);
    }

    /// Random documents and random damage: whenever the scanner takes a document, its output
    /// is the tree path's.
    #[test]
    fn scanner_agrees_on_random_documents() {
        let n = normalizer();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move |k: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % k
        };
        const ATOMS: [&str; 14] = ["0", "-0", "1.25", "-3e2", "1E+400", "7e-3", "true", "false", "null", "\"s\"", "\"é}\"", "12345678901234567890", "\"\"", "0.1"];
        const KEYS: [&str; 10] = ["a", "b", "c", "d", "t", "x", "u", "v", "w", "k"];
        fn gen(rnd: &mut dyn FnMut(u64) -> u64, depth: u32, out: &mut String) {
            match if depth > 3 { 0 } else { rnd(4) } {
                0 | 1 => out.push_str(ATOMS[rnd(ATOMS.len() as u64) as usize]),
                2 => {
                    out.push('[');
                    for i in 0..rnd(4) {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        gen(rnd, depth + 1, out);
                    }
                    out.push(']');
                }
                _ => {
                    out.push('{');
                    for i in 0..rnd(5) {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&format!("\"{}\": ", KEYS[rnd(KEYS.len() as u64) as usize]));
                        gen(rnd, depth + 1, out);
                    }
                    out.push('}');
                }
            }
        }
        let mut taken = 0;
        for round in 0..20_000 {
            let mut doc = String::new();
            gen(&mut rnd, 0, &mut doc);
            let mut bytes = doc.into_bytes();
            if round % 4 == 3 && !bytes.is_empty() {
                let at = rnd(bytes.len() as u64) as usize;
                match rnd(3) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, b",:]}\"\\ 1e-"[rnd(10) as usize]),
                    _ => bytes[at] = b"{[,:0x"[rnd(6) as usize],
                }
            }
            let (fast, tree) = both(&n, &bytes);
            if let Some(fast) = fast {
                taken += 1;
                assert_eq!(fast, tree, "{}", String::from_utf8_lossy(&bytes));
            }
        }
        assert!(taken > 10_000, "the scanner took only {} documents", taken);
    }

    #[test]
    fn offsets() {
        for (text, want) in [("{\"a\": x}", 6), ("{\"a\": 1", 7), ("", 0), ("{\n  \"a\": 1,\n  \"b\" 2}", 18)] {
            let e = serde_json::from_str::<Json>(text).unwrap_err();
            assert_eq!(byte_offset(text.as_bytes(), &e), want, "{:?} {}", text, e);
        }
    }
}
