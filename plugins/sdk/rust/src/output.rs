//! The output side of ABI v1: JSON Lines written into a guest-owned buffer.

use core::fmt::{self, Display, Write};

/// Longest output line the host accepts (without its `\n`).
pub const MAX_LINE: usize = 64 * 1024;

/// The value of a measurement. Build one with `.into()` from f64/f32, i64 and smaller integers,
/// bool, `&str` or `&String`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(&'a str),
}

macro_rules! value_from {
    ($variant:ident: $($t:ty),*) => {$(
        impl<'a> From<$t> for Value<'a> {
            fn from(v: $t) -> Self { Value::$variant(v.into()) }
        }
    )*};
}
value_from!(F64: f64, f32);
value_from!(I64: i64, i32, i16, i8, u32, u16, u8);
value_from!(Bool: bool);

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Str(v)
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Str(v.as_str())
    }
}

/// Quality of a measurement; the host's default is `Good`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    Good,
    Stale,
    Bad,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Stale => "stale",
            Quality::Bad => "bad",
        }
    }
}

/// Writes the output lines about one input message (index [`Output::index`]).
///
/// Every line is a complete JSON object followed by `\n`. Values that JSON cannot carry
/// (NaN, ±inf as value or ts) and lines longer than [`MAX_LINE`] are replaced by an error line
/// naming the measurement, so the host never sees invalid output.
pub struct Output<'a> {
    buf: &'a mut Vec<u8>,
    index: u32,
    lines: u32,
}

impl<'a> Output<'a> {
    /// An output writer appending to `buf` for input message `index`.
    pub fn new(buf: &'a mut Vec<u8>, index: u32) -> Self {
        Output { buf, index, lines: 0 }
    }

    /// Index of the input message these lines are about.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Number of lines written so far for this message (measurements and errors).
    pub fn lines(&self) -> u32 {
        self.lines
    }

    /// One measurement with the message's device and ts and quality "good".
    pub fn measurement<'v>(&mut self, name: &str, value: impl Into<Value<'v>>, unit: &str) {
        self.measurement_ex(name, value, unit, Quality::Good, None, None)
    }

    /// One measurement with explicit quality, and device / ts when they differ from the input
    /// message's (`None` = the host's default: the message's own).
    pub fn measurement_ex<'v>(
        &mut self,
        name: &str,
        value: impl Into<Value<'v>>,
        unit: &str,
        quality: Quality,
        device: Option<&str>,
        ts: Option<f64>,
    ) {
        let value = value.into();
        if let Value::F64(v) = value {
            if !v.is_finite() {
                return self.error(format_args!(
                    "measurement {:?}: value {} is not a finite number (JSON cannot carry it)",
                    name, v
                ));
            }
        }
        if let Some(t) = ts {
            if !t.is_finite() {
                return self.error(format_args!("measurement {:?}: ts {} is not a finite number", name, t));
            }
        }
        let start = self.buf.len();
        self.begin();
        self.buf.extend_from_slice(b",\"name\":");
        write_json_str(self.buf, name);
        self.buf.extend_from_slice(b",\"value\":");
        match value {
            Value::F64(v) => write_f64(self.buf, v),
            Value::I64(v) => {
                let _ = write!(VecWriter(self.buf), "{}", v);
            }
            Value::Bool(v) => self.buf.extend_from_slice(if v { b"true" } else { b"false" }),
            Value::Str(s) => write_json_str(self.buf, s),
        }
        if !unit.is_empty() {
            self.buf.extend_from_slice(b",\"unit\":");
            write_json_str(self.buf, unit);
        }
        if quality != Quality::Good {
            self.buf.extend_from_slice(b",\"quality\":\"");
            self.buf.extend_from_slice(quality.as_str().as_bytes());
            self.buf.push(b'"');
        }
        if let Some(d) = device {
            self.buf.extend_from_slice(b",\"device\":");
            write_json_str(self.buf, d);
        }
        if let Some(t) = ts {
            self.buf.extend_from_slice(b",\"ts\":");
            write_f64(self.buf, t);
        }
        self.buf.extend_from_slice(b"}\n");
        let len = self.buf.len() - start - 1;
        if len > MAX_LINE {
            self.buf.truncate(start);
            self.lines -= 1;
            self.error(format_args!(
                "measurement {:.64?}: output line of {} bytes exceeds the {} byte limit",
                name, len, MAX_LINE
            ));
        }
    }

    /// An error line: the host turns it into an error record for this input message.
    /// Measurements already written for the message are kept.
    pub fn error(&mut self, msg: impl Display) {
        let mut text = String::new();
        let _ = write!(text, "{}", msg);
        // Keep the line under the host's limit (escaping can at most sextuple a byte).
        let cap = MAX_LINE / 6 - 32;
        if text.len() > cap {
            let mut cut = cap;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("…[truncated]");
        }
        self.begin();
        self.buf.extend_from_slice(b",\"error\":");
        write_json_str(self.buf, &text);
        self.buf.extend_from_slice(b"}\n");
    }

    fn begin(&mut self) {
        self.lines += 1;
        self.buf.extend_from_slice(b"{\"i\":");
        let _ = write!(VecWriter(self.buf), "{}", self.index);
    }
}

/// `fmt::Write` over a byte vector (only ever fed valid UTF-8).
pub(crate) struct VecWriter<'a>(pub &'a mut Vec<u8>);

impl<'a> Write for VecWriter<'a> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends `s` as a JSON string: `"` and `\` escaped, control characters as `\n`, `\t`, ... or
/// `\u00XX`; everything else (including non-ASCII UTF-8) verbatim.
pub fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            buf.extend_from_slice(b"\\u00");
            buf.push(HEX[(b >> 4) as usize]);
            buf.push(HEX[(b & 15) as usize]);
        } else {
            buf.extend_from_slice(short);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
    buf.push(b'"');
}

/// Appends a finite f64 as a JSON number that reads back as the same f64 and stays a float in
/// JSON decoders: Rust's shortest round-trip representation, with `.0` on integral values and
/// an exponent for very large or small magnitudes (`21.0`, `0.1`, `1e21`, `1e-7`).
pub fn write_f64(buf: &mut Vec<u8>, v: f64) {
    debug_assert!(v.is_finite());
    let _ = write!(VecWriter(buf), "{:?}", v);
}
