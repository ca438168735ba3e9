//! Native unit tests of the SDK (run with `cargo test` on the build machine).

use std::sync::Mutex;

use crate::output::{write_f64, write_i64, write_json_str, MAX_LINE};
use crate::rt::{last_output, run_process};
use crate::{Key, Message, Output, Quality, Value};

static LOCK: Mutex<()> = Mutex::new(());

fn message(kind: u8, function: u8, address: u16, ts: f64, device: &str, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, function];
    m.extend_from_slice(&address.to_le_bytes());
    m.extend_from_slice(&ts.to_le_bytes());
    m.extend_from_slice(&(device.len() as u16).to_le_bytes());
    m.extend_from_slice(device.as_bytes());
    m.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    m.extend_from_slice(topic.as_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn batch(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut b = (messages.len() as u32).to_le_bytes().to_vec();
    for m in messages {
        b.extend_from_slice(&(m.len() as u32).to_le_bytes());
        b.extend_from_slice(m);
    }
    b
}

fn run(input: &[u8], f: impl FnMut(&Message<'_>, &mut Output<'_>)) -> (i64, String) {
    let rc = unsafe { run_process(input.as_ptr(), input.len(), f) };
    (rc, String::from_utf8(last_output()).unwrap())
}

fn json_str(s: &str) -> String {
    let mut b = Vec::new();
    write_json_str(&mut b, s);
    String::from_utf8(b).unwrap()
}

fn f64_str(v: f64) -> String {
    let mut b = Vec::new();
    write_f64(&mut b, v);
    String::from_utf8(b).unwrap()
}

#[test]
fn escapes_json_strings() {
    assert_eq!(json_str("plain °C"), "\"plain °C\"");
    assert_eq!(json_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    assert_eq!(json_str("\n\r\t\u{8}\u{c}"), "\"\\n\\r\\t\\b\\f\"");
    assert_eq!(json_str("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
    assert_eq!(json_str(""), "\"\"");
}

#[test]
fn floats_stay_floats_and_round_trip() {
    assert_eq!(f64_str(21.0), "21.0");
    assert_eq!(f64_str(-0.5), "-0.5");
    assert_eq!(f64_str(0.1 + 0.2), "0.30000000000000004");
    for v in [1e21, 1e-7, 1.7976931348623157e308, 5e-324, 123456789.125, -2.5e-300] {
        let s = f64_str(v);
        assert_eq!(s.parse::<f64>().unwrap(), v, "{}", s);
        assert!(s.contains('.') || s.contains('e'), "{}", s);
    }
}

/// xorshift64*: deterministic pseudo-random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The short-decimal fast path must give Ryū's exact text, and every text must read back.
#[test]
fn floats_match_ryu_text() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut values = vec![
        0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 0.0001, 0.00012, 0.00001, 21.5, 1.53, 65.0, 1234.0, 3.01,
        4503599627370495.5, 9007199254740991.0, 9007199254740992.0, 9007199254740993.0, 1e15, 1e16,
        999999999999999.9, 123456789012.3456, 0.1 + 0.2, f64::from(12.5f32), f64::from(0.1f32),
        f64::MAX, f64::MIN_POSITIVE, 5e-324,
    ];
    for _ in 0..200_000 {
        let r = rng.next();
        let v = match r % 4 {
            // decimals with up to 6 digits after the point, magnitudes up to 10^16
            0 | 1 => {
                let digits = (r >> 8) % 7;
                let m = rng.next() % 10u64.pow(1 + ((r >> 16) % 16) as u32);
                m as f64 / 10f64.powi(digits as i32)
            }
            // scaled register words, as modbus_decode makes them
            2 => f64::from((r >> 8) as u16 as i16) * [0.1, 0.01, 0.5, 0.001, 1.0][((r >> 32) % 5) as usize],
            // any finite bit pattern
            _ => {
                let v = f64::from_bits(rng.next());
                if v.is_finite() { v } else { 1.5 }
            }
        };
        values.push(if r & (1 << 63) != 0 { -v } else { v });
    }
    for v in values {
        let s = f64_str(v);
        let want = ryu::Buffer::new().format_finite(v).to_string();
        assert_eq!(s, want, "{:e}", v);
        assert_eq!(s.parse::<f64>().unwrap().to_bits(), v.to_bits(), "{}", s);
    }
}

#[test]
fn integers() {
    for v in [0i64, 7, -7, 10, 65535, -32768, i64::MAX, i64::MIN, 1_700_000_000] {
        let mut b = Vec::new();
        write_i64(&mut b, v);
        assert_eq!(String::from_utf8(b).unwrap(), v.to_string());
    }
}

/// `put` through a prepared key writes the same line as `measurement_ex`, for names and units
/// of every short length (the word-copy path) and with escapes.
#[test]
fn prepared_keys_write_the_same_lines() {
    let _g = LOCK.lock().unwrap();
    let input = batch(&[message(1, 3, 0, 1.0, "d", "", &[]), message(1, 3, 0, 1.0, "d", "", &[])]);
    let names: Vec<String> = (0..40).map(|n| "abcdefghij".chars().cycle().take(n).collect()).collect();
    let values = [Value::F64(21.5), Value::I64(-3), Value::Bool(false), Value::Str("t\"x")];
    let mut cases = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let unit = &names[(k * 7) % 40];
        let quality = [Quality::Good, Quality::Stale, Quality::Bad][k % 3];
        cases.push((format!("{}\u{1}°\"", name), unit.clone(), quality));
        cases.push((name.clone(), unit.clone(), quality));
    }
    let (_, out) = run(&input, |m, o| {
        for (k, (name, unit, quality)) in cases.iter().enumerate() {
            let value = values[k % values.len()];
            let (device, ts) = if k % 5 == 0 { (Some("dev"), Some(2.5)) } else { (None, None) };
            if m.index == 0 {
                o.measurement_ex(name, value, unit, *quality, device, ts);
            } else {
                o.put_ex(&Key::with_quality(name, unit, *quality), value, device, ts);
            }
        }
    });
    let lines: Vec<&str> = out.lines().collect();
    let (a, b) = lines.split_at(cases.len());
    assert_eq!(b.len(), cases.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.replacen("{\"i\":0", "{\"i\":1", 1), *y);
        #[cfg(feature = "json")]
        serde_json::from_str::<serde_json::Value>(y).unwrap();
    }
    let key = Key::new("t", "°C");
    assert_eq!(key.name(), "t");
    let (_, out) = run(&input[..], |_, o| o.put(&key, 1.5));
    assert_eq!(out, "{\"i\":0,\"name\":\"t\",\"value\":1.5,\"unit\":\"°C\"}\n{\"i\":1,\"name\":\"t\",\"value\":1.5,\"unit\":\"°C\"}\n");
}

#[test]
fn processes_each_message_with_index_and_fields() {
    let _g = LOCK.lock().unwrap();
    let regs: Vec<u8> = [0x1234u16, 7].iter().flat_map(|w| w.to_le_bytes()).collect();
    let input = batch(&[
        message(1, 3, 100, 1700000000.5, "boiler", "", &regs),
        message(0, 0, 0, 2.0, "dev\"x", "a/b", b"hi"),
    ]);
    let (rc, out) = run(&input, |m, o| {
        if m.kind == 1 {
            let words: Vec<u16> = m.registers().collect();
            assert_eq!(words, vec![0x1234, 7]);
            assert_eq!((m.function, m.address, m.ts, m.device), (3, 100, 1700000000.5, "boiler"));
            o.measurement("w0", words[0], "");
            o.measurement_ex("t", 1.5, "°C", Quality::Stale, Some("other"), Some(3.25));
        } else {
            assert_eq!((m.device, m.topic, m.payload), ("dev\"x", "a/b", &b"hi"[..]));
            o.measurement("flag", true, "");
            o.measurement("text", m.payload_str().unwrap(), "");
        }
    });
    assert!(rc != 0 && rc != -1); // packed ptr|len (pointers are 64-bit natively)
    assert_eq!(
        out,
        "{\"i\":0,\"name\":\"w0\",\"value\":4660}\n\
         {\"i\":0,\"name\":\"t\",\"value\":1.5,\"unit\":\"°C\",\"quality\":\"stale\",\"device\":\"other\",\"ts\":3.25}\n\
         {\"i\":1,\"name\":\"flag\",\"value\":true}\n\
         {\"i\":1,\"name\":\"text\",\"value\":\"hi\"}\n"
    );
}

#[test]
fn non_finite_values_become_errors() {
    let _g = LOCK.lock().unwrap();
    let input = batch(&[message(1, 3, 0, 1.0, "d", "", &[])]);
    let (_, out) = run(&input, |_, o| {
        o.measurement("x", f64::NAN, "");
        o.measurement_ex("y", 1.0, "", Quality::Good, None, Some(f64::INFINITY));
        o.measurement("z", f64::NEG_INFINITY, "");
    });
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("{\"i\":0,\"error\":\"measurement \\\"x\\\": value NaN"), "{}", lines[0]);
    assert!(lines[1].contains("ts inf is not a finite number"), "{}", lines[1]);
    assert!(lines[2].contains("value -inf"), "{}", lines[2]);
}

#[test]
fn overlong_lines_become_errors() {
    let _g = LOCK.lock().unwrap();
    let input = batch(&[message(0, 0, 0, 1.0, "d", "", &[])]);
    let big = "x".repeat(MAX_LINE);
    let (_, out) = run(&input, |_, o| {
        o.measurement("big", big.as_str(), "");
        o.error(big.as_str());
        assert_eq!(o.lines(), 2);
    });
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].contains("exceeds the 65536 byte limit"));
    assert!(lines[1].len() < MAX_LINE && lines[1].ends_with("…[truncated]\"}"));
}

#[test]
fn malformed_message_is_an_error_line_and_the_next_still_runs() {
    let _g = LOCK.lock().unwrap();
    let mut bad = message(1, 3, 0, 1.0, "d", "", &[1, 0]);
    bad.truncate(bad.len() - 1); // payload_len says 2, only 1 byte follows
    let input = batch(&[bad, message(1, 3, 0, 1.0, "d", "", &[9, 0])]);
    let mut seen = Vec::new();
    let (rc, out) = run(&input, |m, _| seen.push(m.index));
    assert!(rc != 0 && rc != -1); // packed ptr|len (pointers are 64-bit natively)
    assert_eq!(seen, vec![1]);
    assert!(out.starts_with("{\"i\":0,\"error\":\"malformed input message: payload needs 2 bytes"), "{}", out);
}

#[test]
fn extra_bytes_after_known_fields_are_skipped() {
    let _g = LOCK.lock().unwrap();
    let mut m0 = message(0, 0, 0, 1.0, "a", "", b"x");
    m0.extend_from_slice(b"future fields");
    let input = batch(&[m0, message(0, 0, 0, 1.0, "b", "", b"y")]);
    let mut devices = Vec::new();
    let (rc, out) = run(&input, |m, _| devices.push(m.device.to_string()));
    assert_eq!((rc, out.as_str()), (0, ""));
    assert_eq!(devices, vec!["a", "b"]);
}

#[test]
fn broken_framing_fails_the_batch() {
    let _g = LOCK.lock().unwrap();
    let mut input = batch(&[message(0, 0, 0, 1.0, "a", "", b"x")]);
    input[0] = 2; // claims two messages
    let (rc, _) = run(&input, |_, _| {});
    assert_eq!(rc, -1);
    let logged = crate::log::take_logged();
    assert!(logged.iter().any(|(_, m)| m.contains("message 1: message size needs 4 bytes")), "{:?}", logged);
    let (rc, _) = run(&[], |_, _| {});
    assert_eq!(rc, -1);
}

#[test]
fn allocator_handles_zero_and_huge_sizes() {
    unsafe {
        let p = crate::rt::alloc(0);
        assert!(!p.is_null());
        crate::rt::dealloc(p, 0);
        let p = crate::rt::alloc(100);
        assert!(!p.is_null() && p as usize % 8 == 0);
        core::ptr::write_bytes(p, 0xAB, 100);
        crate::rt::dealloc(p, 100);
        assert!(crate::rt::alloc(usize::MAX - 3).is_null());
        crate::rt::dealloc(core::ptr::null_mut(), 5);
    }
}

#[test]
fn log_macros_format() {
    crate::info!("read {} words from {:?}", 3, "boiler");
    crate::error!("plain");
    let logged = crate::log::take_logged();
    assert_eq!(
        logged,
        vec![
            (crate::log::Level::Info, "read 3 words from \"boiler\"".to_string()),
            (crate::log::Level::Error, "plain".to_string())
        ]
    );
}
