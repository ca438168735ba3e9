//! The input side of ABI v1: the batch the host writes and the [`Message`] view of one message.

use core::slice::ChunksExact;

/// `payload` holds raw bytes (a serial frame, an MQTT payload).
pub const KIND_BYTES: u8 = 0;
/// `payload` holds 16-bit register words, little-endian as stored (see [`Message::registers`]).
pub const KIND_REGISTERS: u8 = 1;
/// `payload` holds a measurement as a JSON object (output of the previous plugin in a chain).
pub const KIND_MEASUREMENT: u8 = 2;

/// Modbus function codes carried in [`Message::function`].
pub const FN_COIL: u8 = 1;
pub const FN_DISCRETE: u8 = 2;
pub const FN_HOLDING: u8 = 3;
pub const FN_INPUT: u8 = 4;

/// One input message of a batch, borrowed from the host's input buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Message<'a> {
    /// Position of the message in the batch (the `i` of every output line about it).
    pub index: u32,
    /// [`KIND_BYTES`], [`KIND_REGISTERS`] or [`KIND_MEASUREMENT`].
    pub kind: u8,
    /// Modbus function code (1 coil, 2 discrete, 3 holding, 4 input) or 0.
    pub function: u8,
    /// First register address (kind 1) or 0.
    pub address: u16,
    /// Unix time in seconds when the data was received.
    pub ts: f64,
    pub device: &'a str,
    /// MQTT topic, serial port, or empty.
    pub topic: &'a str,
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// The payload as 16-bit words (kind 1). A trailing odd byte is ignored; see
    /// [`Message::register_count`] and check `payload.len() % 2` if that matters to you.
    pub fn registers(&self) -> Registers<'a> {
        Registers { chunks: self.payload.chunks_exact(2) }
    }

    /// Number of whole 16-bit words in the payload.
    pub fn register_count(&self) -> usize {
        self.payload.len() / 2
    }

    /// Word `i` of the payload, if there is one.
    pub fn register(&self, i: usize) -> Option<u16> {
        let b = self.payload.get(2 * i..2 * i + 2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    /// The payload as UTF-8 text.
    pub fn payload_str(&self) -> Result<&'a str, core::str::Utf8Error> {
        core::str::from_utf8(self.payload)
    }

    /// A word for the message kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            KIND_BYTES => "bytes",
            KIND_REGISTERS => "registers",
            KIND_MEASUREMENT => "measurement",
            _ => "unknown",
        }
    }
}

/// Iterator over the 16-bit words of a kind-1 payload.
#[derive(Debug, Clone)]
pub struct Registers<'a> {
    chunks: ChunksExact<'a, u8>,
}

impl<'a> Iterator for Registers<'a> {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        self.chunks.next().map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chunks.size_hint()
    }
}

impl<'a> DoubleEndedIterator for Registers<'a> {
    fn next_back(&mut self) -> Option<u16> {
        self.chunks.next_back().map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
}

impl<'a> ExactSizeIterator for Registers<'a> {}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline(always)]
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(short(what, n, self.pos, left));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline(always)]
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    #[inline(always)]
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cold]
#[inline(never)]
fn short(what: &str, n: usize, pos: usize, left: usize) -> String {
    format!("{} needs {} bytes at offset {}, only {} left", what, n, pos, left)
}

fn parse_message(index: u32, body: &[u8]) -> Result<Message<'_>, String> {
    let mut c = Cursor { data: body, pos: 0 };
    let kind = c.take(1, "kind")?[0];
    let function = c.take(1, "function")?[0];
    let address = c.u16("address")?;
    let t = c.take(8, "ts")?;
    let ts = f64::from_le_bytes([t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]]);
    let n = c.u16("device_len")? as usize;
    let device = core::str::from_utf8(c.take(n, "device")?)
        .map_err(|e| format!("device name is not valid UTF-8: {}", e))?;
    let n = c.u16("topic_len")? as usize;
    let topic = core::str::from_utf8(c.take(n, "topic")?)
        .map_err(|e| format!("topic is not valid UTF-8: {}", e))?;
    let n = c.u32("payload_len")? as usize;
    let payload = c.take(n, "payload")?;
    // Bytes after the payload belong to fields of a later minor revision: ignored.
    Ok(Message { index, kind, function, address, ts, device, topic, payload })
}

/// Walks a batch, calling `each(index, message-or-error)` per message. A message whose body is
/// malformed is reported as `Err(reason)` and skipped (its `size` says where the next one starts);
/// a batch whose framing (`count`, `size`) runs past the input fails as a whole.
pub(crate) fn for_each_message<'a>(
    input: &'a [u8],
    mut each: impl FnMut(u32, Result<Message<'a>, String>),
) -> Result<(), String> {
    let mut c = Cursor { data: input, pos: 0 };
    let count = c.u32("batch count")?;
    for index in 0..count {
        let size = c.u32("message size").map_err(|e| format!("message {}: {}", index, e))?;
        let body = c.take(size as usize, "message").map_err(|e| format!("message {}: {}", index, e))?;
        each(index, parse_message(index, body).map_err(|e| format!("malformed input message: {}", e)));
    }
    Ok(())
}
