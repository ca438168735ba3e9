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
    /// name and unit, turned into JSON once for every output line
    key: Key,
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
    /// The scanner's table of top-level members, reused from message to message.
    members: Vec<scan::Member>,
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
    let unit = string(obj, "unit")?.unwrap_or("");
    Ok(Field {
        key: Key::new(&name, unit),
        path,
        name,
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
    Ok(Normalizer { fields, device_path, ts_path, ts_unit, members: Vec::new() })
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

/// The fast path met something only the serde_json path renders exactly (a numeric device id):
/// nothing has been written yet, so the message is processed again that way.
struct Redo;

/// Normalizes one document; `get` finds the (non-null) value at a path.
fn normalize<'d>(
    n: &Normalizer,
    get: &dyn Fn(&Path) -> Option<Val<'d>>,
    device_number: &dyn Fn(&Path) -> Option<String>,
    out: &mut Output,
) -> Result<Result<(), String>, Redo> {
    let ts = match n.ts_path.as_ref().and_then(|p| get(p).map(|v| (p, v))) {
        None => None,
        Some((p, v)) => {
            let t = match v {
                Val::Num(t) => t,
                _ => return Ok(Err(format!("ts_path {} is {}, expected unix seconds or milliseconds", p.text, v.kind()))),
            };
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
    let device = match n.device_path.as_ref().map(|p| (p, get(p))) {
        None | Some((_, None)) => None,
        Some((_, Some(Val::Str(s)))) => Some(s),
        Some((p, Some(Val::Num(_) | Val::BadNum(_)))) => {
            device_text = device_number(p).ok_or(Redo)?;
            Some(device_text.as_str())
        }
        Some((p, Some(v))) => return Ok(Err(format!("device_path {} is {}, expected a string", p.text, v.kind()))),
    };

    for f in &n.fields {
        let v = match get(&f.path) {
            Some(v) => v,
            None if f.required => {
                out.error(format_args!("required field {:?} (path {}) is missing", f.name, f.path.text));
                continue;
            }
            None => continue,
        };
        let value = match v {
            Val::Num(x) => Value::F64(x * f.scale + f.offset),
            Val::BadNum(x) => {
                out.error(format_args!("field {:?} (path {}): {} is not representable", f.name, f.path.text, x));
                continue;
            }
            Val::Bool(b) => Value::Bool(b),
            Val::Str(s) => Value::Str(s),
            other => {
                out.error(format_args!(
                    "field {:?} (path {}) is {}, expected a number, bool or string",
                    f.name,
                    f.path.text,
                    other.kind()
                ));
                continue;
            }
        };
        out.put_ex(&f.key, value, device, ts);
    }
    Ok(Ok(()))
}

fn process(n: &mut Normalizer, m: &Message, out: &mut Output) -> Result<(), String> {
    if m.kind == KIND_REGISTERS {
        return Err("expected a JSON payload (kind 0 or 2), got register words (kind 1)".to_string());
    }
    // Fast path: a document the scanner accepts is read in place, without building a tree.
    let mut members = core::mem::take(&mut n.members);
    let done = match scan::Doc::new(m.payload, &mut members) {
        Some(doc) => normalize(n, &|p| doc.get(&p.steps), &|_| None, out).ok(),
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
    match normalize(n, &|p| p.get(&doc).and_then(Val::of), &device_number, out) {
        Ok(r) => r,
        Err(Redo) => unreachable!("the tree path renders numeric devices itself"),
    }
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
            .and_then(|doc| run(&|out| normalize(n, &|p| doc.get(&p.steps), &|_| None, out).ok()));
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
