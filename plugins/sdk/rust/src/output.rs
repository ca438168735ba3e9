//! The output side of ABI v1: JSON Lines written into a guest-owned buffer.
//!
//! This is the guest's hot path (a plugin writes several lines per input message), so a line is
//! written without `core::fmt`: its length is bounded first, the buffer grown once, and the
//! parts copied straight into it; integers are converted by hand and floats with Ryū
//! (shortest round-trip form). `core::fmt` is used only for error lines.

use core::fmt::{Display, Write};
use core::ptr;

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

/// A measurement's name, unit and quality, turned into JSON once (e.g. in `init`) so that
/// [`Output::put`] only writes the value: the fastest way to write a measurement whose name is
/// known in advance (a register map, a field map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    name: String,
    /// `,"name":"<name>","value":`
    head: Vec<u8>,
    /// `,"unit":"<unit>"` (when not empty) and `,"quality":"<quality>"` (when not good).
    tail: Vec<u8>,
}

impl Key {
    /// A key for measurements of quality "good".
    pub fn new(name: &str, unit: &str) -> Key {
        Key::with_quality(name, unit, Quality::Good)
    }

    /// A key with an explicit quality.
    pub fn with_quality(name: &str, unit: &str, quality: Quality) -> Key {
        let mut head = Vec::with_capacity(name.len() + 20);
        head.extend_from_slice(b",\"name\":");
        write_json_str(&mut head, name);
        head.extend_from_slice(b",\"value\":");
        let mut tail = Vec::new();
        if !unit.is_empty() {
            tail.extend_from_slice(b",\"unit\":");
            write_json_str(&mut tail, unit);
        }
        if quality != Quality::Good {
            tail.extend_from_slice(b",\"quality\":\"");
            tail.extend_from_slice(quality.as_str().as_bytes());
            tail.push(b'"');
        }
        Key { name: name.to_string(), head, tail }
    }

    /// The measurement name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Where the name, unit and quality of a line come from.
enum Fixed<'k> {
    Key(&'k Key),
    Parts { name: &'k str, unit: &'k str, quality: Quality },
}

impl<'k> Fixed<'k> {
    fn name(&self) -> &'k str {
        match *self {
            Fixed::Key(k) => k.name.as_str(),
            Fixed::Parts { name, .. } => name,
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
    /// `{"i":<index>`, rendered once per message.
    prefix: [u8; 16],
    prefix_len: u8,
}

impl<'a> Output<'a> {
    /// An output writer appending to `buf` for input message `index`.
    pub fn new(buf: &'a mut Vec<u8>, index: u32) -> Self {
        let mut prefix = [0u8; 16];
        prefix[..5].copy_from_slice(b"{\"i\":");
        let mut len = 6;
        let mut v = index;
        while v >= 10 {
            v /= 10;
            len += 1;
        }
        let mut v = index;
        for k in (5..len).rev() {
            prefix[k] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        Output { buf, index, lines: 0, prefix, prefix_len: len as u8 }
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
        self.line(Fixed::Parts { name, unit, quality: Quality::Good }, value.into(), None, None)
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
        self.line(Fixed::Parts { name, unit, quality }, value.into(), device, ts)
    }

    /// One measurement under a prepared [`Key`], with the message's device and ts.
    pub fn put<'v>(&mut self, key: &Key, value: impl Into<Value<'v>>) {
        self.line(Fixed::Key(key), value.into(), None, None)
    }

    /// One measurement under a prepared [`Key`], with device / ts when they differ from the
    /// input message's (`None` = the message's own).
    pub fn put_ex<'v>(&mut self, key: &Key, value: impl Into<Value<'v>>, device: Option<&str>, ts: Option<f64>) {
        self.line(Fixed::Key(key), value.into(), device, ts)
    }

    fn line(&mut self, fixed: Fixed<'_>, value: Value<'_>, device: Option<&str>, ts: Option<f64>) {
        if let Value::F64(v) = value {
            if !v.is_finite() {
                return self.error(format_args!(
                    "measurement {:?}: value {} is not a finite number (JSON cannot carry it)",
                    fixed.name(),
                    v
                ));
            }
        }
        if let Some(t) = ts {
            if !t.is_finite() {
                return self.error(format_args!("measurement {:?}: ts {} is not a finite number", fixed.name(), t));
            }
        }
        // Bytes of text that go in escaped (escaping at most sextuples a byte) and bytes that
        // go in verbatim; a line whose text alone is over the limit is refused before it is
        // written, so a huge string cannot make the buffer grow past the guest's memory.
        let mut text = device.map_or(0, str::len);
        if let Value::Str(s) = value {
            text += s.len();
        }
        let mut verbatim = 0;
        match fixed {
            Fixed::Key(k) => verbatim += k.head.len() + k.tail.len(),
            Fixed::Parts { name, unit, .. } => text += name.len() + unit.len(),
        }
        if text + verbatim > MAX_LINE {
            return self.error(format_args!(
                "measurement {:.64?}: output line of more than {} bytes exceeds the {} byte limit",
                fixed.name(),
                text + verbatim,
                MAX_LINE
            ));
        }
        // prefix 15 + name/value/unit/quality/device/ts keys and quotes < 80 + value 24 + ts 24
        let bound = 6 * text + verbatim + 160;
        let start = self.buf.len();
        self.buf.reserve(bound);
        // SAFETY: `bound` bytes of spare capacity were just reserved and the writes below stay
        // within it (each part's size is counted in `bound`); `set_len` then covers exactly
        // what was written, all of it initialised.
        unsafe {
            let mut c = Cur(self.buf.as_mut_ptr().add(start));
            let first = c.0;
            c.bytes(&self.prefix[..self.prefix_len as usize]);
            match fixed {
                Fixed::Key(k) => c.bytes(&k.head),
                Fixed::Parts { name, .. } => {
                    c.bytes(b",\"name\":");
                    c.json_str(name.as_bytes());
                    c.bytes(b",\"value\":");
                }
            }
            match value {
                Value::F64(v) => c.f64(v),
                Value::I64(v) => c.i64(v),
                Value::Bool(true) => c.bytes(b"true"),
                Value::Bool(false) => c.bytes(b"false"),
                Value::Str(s) => c.json_str(s.as_bytes()),
            }
            match fixed {
                Fixed::Key(k) => c.bytes(&k.tail),
                Fixed::Parts { unit, quality, .. } => {
                    if !unit.is_empty() {
                        c.bytes(b",\"unit\":");
                        c.json_str(unit.as_bytes());
                    }
                    if quality != Quality::Good {
                        c.bytes(b",\"quality\":\"");
                        c.bytes(quality.as_str().as_bytes());
                        c.byte(b'"');
                    }
                }
            }
            if let Some(d) = device {
                c.bytes(b",\"device\":");
                c.json_str(d.as_bytes());
            }
            if let Some(t) = ts {
                c.bytes(b",\"ts\":");
                c.f64(t);
            }
            c.bytes(b"}\n");
            let written = c.0.offset_from(first) as usize;
            debug_assert!(written <= bound);
            self.buf.set_len(start + written);
        }
        self.lines += 1;
        let len = self.buf.len() - start - 1;
        if len > MAX_LINE {
            self.buf.truncate(start);
            self.lines -= 1;
            self.error(format_args!(
                "measurement {:.64?}: output line of {} bytes exceeds the {} byte limit",
                fixed.name(),
                len,
                MAX_LINE
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
        self.lines += 1;
        self.buf.extend_from_slice(&self.prefix[..self.prefix_len as usize]);
        self.buf.extend_from_slice(b",\"error\":");
        write_json_str(self.buf, &text);
        self.buf.extend_from_slice(b"}\n");
    }
}

#[inline(always)]
unsafe fn copy8(src: *const u8, dst: *mut u8, at: usize) {
    ptr::write_unaligned(dst.add(at) as *mut u64, ptr::read_unaligned(src.add(at) as *const u64));
}

/// A write cursor into reserved, uninitialised spare capacity (see `Output::line`).
struct Cur(*mut u8);

impl Cur {
    #[inline(always)]
    unsafe fn byte(&mut self, b: u8) {
        *self.0 = b;
        self.0 = self.0.add(1);
    }

    /// Copies `s`. Short runs (most of a line's parts) are copied with a few unaligned moves
    /// instead of a call to `memcpy`, which wasm32 without bulk memory runs as a loop. There is
    /// no loop here on purpose: LLVM would turn one back into a `memcpy` call.
    #[inline(always)]
    unsafe fn bytes(&mut self, s: &[u8]) {
        let (src, dst, n) = (s.as_ptr(), self.0, s.len());
        if n > 32 {
            ptr::copy_nonoverlapping(src, dst, n);
        } else if n >= 8 {
            // Words at 0, 8 and 16 as far as they fit, and the last word aligned to the end
            // (overlapping what is already copied).
            copy8(src, dst, 0);
            if n > 16 {
                copy8(src, dst, 8);
                if n > 24 {
                    copy8(src, dst, 16);
                }
            }
            copy8(src, dst, n - 8);
        } else if n >= 4 {
            let head = ptr::read_unaligned(src as *const u32);
            let tail = ptr::read_unaligned(src.add(n - 4) as *const u32);
            ptr::write_unaligned(dst as *mut u32, head);
            ptr::write_unaligned(dst.add(n - 4) as *mut u32, tail);
        } else if n > 0 {
            *dst = *src;
            *dst.add(n / 2) = *src.add(n / 2);
            *dst.add(n - 1) = *src.add(n - 1);
        }
        self.0 = dst.add(n);
    }

    /// At most 2 + 6 * s.len() bytes.
    unsafe fn json_str(&mut self, s: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.byte(b'"');
        let mut start = 0;
        for (i, &b) in s.iter().enumerate() {
            if b >= 0x20 && b != b'"' && b != b'\\' {
                continue;
            }
            self.bytes(s.get_unchecked(start..i));
            match b {
                b'"' => self.bytes(b"\\\""),
                b'\\' => self.bytes(b"\\\\"),
                b'\n' => self.bytes(b"\\n"),
                b'\r' => self.bytes(b"\\r"),
                b'\t' => self.bytes(b"\\t"),
                0x08 => self.bytes(b"\\b"),
                0x0c => self.bytes(b"\\f"),
                _ => {
                    self.bytes(b"\\u00");
                    self.byte(HEX[(b >> 4) as usize]);
                    self.byte(HEX[(b & 15) as usize]);
                }
            }
            start = i + 1;
        }
        self.bytes(s.get_unchecked(start..));
        self.byte(b'"');
    }

    /// At most 24 bytes; `v` must be finite.
    unsafe fn f64(&mut self, v: f64) {
        if !self.short_f64(v) {
            let n = ryu::raw::format64(v, self.0);
            self.0 = self.0.add(n);
        }
    }

    /// Fast path for the common sensor value with at most [`SHORT_DIGITS`] decimals and a
    /// magnitude below 2^53 / 10^k (`21.5`, `1.53`, `1234.0`): the smallest k for which
    /// `m / 10^k` (m an integer) reads back as exactly `v` gives the same text Ryū would.
    /// Returns false (nothing written) when `v` needs more digits, is zero (sign of -0.0) or
    /// is too large; Ryū handles those.
    #[inline]
    unsafe fn short_f64(&mut self, v: f64) -> bool {
        const POW10: [f64; SHORT_DIGITS + 1] = [1.0, 10.0, 100.0, 1000.0, 10000.0];
        const LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53: m and m as f64 stay exact
        let a = v.abs();
        if !(a > 0.0) {
            return false;
        }
        let mut k = 0;
        while k <= SHORT_DIGITS {
            let p = POW10[k];
            let s = a * p;
            if !(s < LIMIT) {
                return false;
            }
            let m = (s + 0.5) as u64;
            let mf = m as f64;
            // A decimal that reads back as `a` lies within half an ulp of it, so m is within
            // about an ulp of s (2^-52 relative): test that cheaply before dividing. Division
            // is correctly rounded: equality means the decimal m / 10^k parses back to exactly
            // `a` (10^k is exact for k <= 22).
            if (s - mf).abs() <= s * 1e-15 && mf / p == a {
                if v < 0.0 {
                    self.byte(b'-');
                }
                let mut digits = [0u8; 20];
                let d = dec_u64(&mut digits, m);
                if k == 0 {
                    self.bytes(d);
                    self.bytes(b".0");
                } else if d.len() > k {
                    let int = d.len() - k;
                    self.bytes(&d[..int]);
                    self.byte(b'.');
                    self.bytes(&d[int..]);
                } else {
                    self.bytes(b"0.");
                    for _ in d.len()..k {
                        self.byte(b'0');
                    }
                    self.bytes(d);
                }
                return true;
            }
            k += 1;
        }
        false
    }

    /// At most 20 bytes.
    unsafe fn i64(&mut self, v: i64) {
        if v < 0 {
            self.byte(b'-');
        }
        let mut digits = [0u8; 20];
        self.bytes(dec_u64(&mut digits, v.unsigned_abs()));
    }
}

/// Decimals [`Cur::short_f64`] tries before it leaves a float to Ryū.
const SHORT_DIGITS: usize = 4;

/// The decimal digits of `v`, written at the end of `digits`. Values that fit in 32 bits (all
/// the common ones) are divided as u32: wasm32 code divides a u64 by 10 with a real division,
/// a u32 with a multiplication.
fn dec_u64(digits: &mut [u8; 20], v: u64) -> &[u8] {
    let mut i = digits.len();
    let mut low = match u32::try_from(v) {
        Ok(v) => v,
        Err(_) => {
            let mut v = v;
            while v > u64::from(u32::MAX) {
                i -= 1;
                digits[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
            v as u32
        }
    };
    loop {
        i -= 1;
        digits[i] = b'0' + (low % 10) as u8;
        low /= 10;
        if low == 0 {
            return &digits[i..];
        }
    }
}

/// Appends `s` as a JSON string: `"` and `\` escaped, control characters as `\n`, `\t`, ... or
/// `\u00XX`; everything else (including non-ASCII UTF-8) verbatim.
pub fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    let bound = 2 + 6 * s.len();
    buf.reserve(bound);
    // SAFETY: `bound` bytes were reserved; json_str writes at most that many.
    unsafe {
        let start = buf.len();
        let mut c = Cur(buf.as_mut_ptr().add(start));
        let first = c.0;
        c.json_str(s.as_bytes());
        buf.set_len(start + c.0.offset_from(first) as usize);
    }
}

/// Appends a finite f64 as a JSON number that reads back as the same f64 and stays a float in
/// JSON decoders: the shortest round-trip representation (Ryū), with `.0` on integral values
/// and an exponent for very large or small magnitudes (`21.0`, `0.1`, `1e21`, `1e-7`).
pub fn write_f64(buf: &mut Vec<u8>, v: f64) {
    assert!(v.is_finite(), "write_f64: {} is not finite", v);
    buf.reserve(24);
    // SAFETY: 24 bytes were reserved; Ryū writes at most 24.
    unsafe {
        let start = buf.len();
        let n = ryu::raw::format64(v, buf.as_mut_ptr().add(start));
        buf.set_len(start + n);
    }
}

/// Appends an integer in decimal.
pub fn write_i64(buf: &mut Vec<u8>, v: i64) {
    buf.reserve(20);
    // SAFETY: 20 bytes were reserved; an i64 has at most 20 characters.
    unsafe {
        let start = buf.len();
        let mut c = Cur(buf.as_mut_ptr().add(start));
        let first = c.0;
        c.i64(v);
        buf.set_len(start + c.0.offset_from(first) as usize);
    }
}
