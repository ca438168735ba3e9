//! Runtime behind the exports the [`flux_plugin!`](crate::flux_plugin) macro generates.
//! Public only so that the macro can reach it; not a stable API.

use core::fmt::Display;
use std::alloc::Layout;

use crate::log::{log_str, Level};
use crate::message::{for_each_message, Message};
use crate::output::Output;

/// Alignment of every `flux_alloc` block (enough for any scalar the host might write).
const ALIGN: usize = 8;

/// `flux_alloc(size)`: a block from Rust's global allocator; 0 when it cannot be had.
/// Size 0 gets a real 1-byte block, so every non-zero pointer can be passed to `flux_dealloc`.
///
/// # Safety
/// Only to be called by the host through the export.
pub unsafe fn alloc(size: usize) -> *mut u8 {
    match Layout::from_size_align(size.max(1), ALIGN) {
        Ok(layout) => std::alloc::alloc(layout),
        Err(_) => core::ptr::null_mut(),
    }
}

/// `flux_dealloc(ptr, size)`: frees what `alloc(size)` returned; a null pointer is ignored.
///
/// # Safety
/// `ptr` must come from [`alloc`] with the same `size`.
pub unsafe fn dealloc(ptr: *mut u8, size: usize) {
    if ptr.is_null() {
        return;
    }
    if let Ok(layout) = Layout::from_size_align(size.max(1), ALIGN) {
        std::alloc::dealloc(ptr, layout)
    }
}

/// What an init function may return: `()` or `Result<(), E: Display>`.
pub trait InitResult {
    fn into_init_result(self) -> Result<(), String>;
}

impl InitResult for () {
    fn into_init_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Display> InitResult for Result<(), E> {
    fn into_init_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// What a process function may return: `()` or `Result<(), E: Display>` (an `Err` becomes an
/// error line for the message).
pub trait ProcessResult {
    fn report(self, out: &mut Output<'_>);
}

impl ProcessResult for () {
    fn report(self, _out: &mut Output<'_>) {}
}

impl<E: Display> ProcessResult for Result<(), E> {
    fn report(self, out: &mut Output<'_>) {
        if let Err(e) = self {
            out.error(e)
        }
    }
}

/// Converts a stateful init's result.
pub fn state_result<T, E: Display>(r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// `flux_init` return code when the plugin refused its config.
pub const INIT_REFUSED: i32 = 1;

unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        core::slice::from_raw_parts(ptr, len)
    }
}

/// Body of `flux_init`: 0 when `f` accepts the config, else logs its reason at error level and
/// returns [`INIT_REFUSED`].
///
/// # Safety
/// `ptr`/`len` must describe readable guest memory (the host's config block).
pub unsafe fn run_init(ptr: *const u8, len: usize, f: impl FnOnce(&[u8]) -> Result<(), String>) -> i32 {
    match f(bytes(ptr, len)) {
        Ok(()) => 0,
        Err(msg) => {
            log_str(Level::Error, &msg);
            INIT_REFUSED
        }
    }
}

/// Parses the config for `init_json:` plugins.
#[cfg(feature = "json")]
pub fn parse_json(cfg: &[u8]) -> Result<serde_json::Value, String> {
    serde_json::from_slice(cfg).map_err(|e| format!("config is not valid JSON: {}", e))
}

static mut OUT: Vec<u8> = Vec::new();

/// Body of `flux_process`: calls `f` once per message of the batch, collects the JSON Lines
/// in a buffer that is reused between calls and returns `(ptr << 32) | len` (0 for no output).
/// A batch whose framing is broken returns -1 (the host fails the whole batch) after logging
/// why; a malformed single message becomes an error line.
///
/// # Safety
/// `ptr`/`len` must describe readable guest memory (the host's input buffer); not reentrant.
pub unsafe fn run_process(ptr: *const u8, len: usize, mut f: impl FnMut(&Message<'_>, &mut Output<'_>)) -> i64 {
    let input = bytes(ptr, len);
    // SAFETY: wasm32 guests are single-threaded and flux_process is not reentrant.
    let buf = &mut *core::ptr::addr_of_mut!(OUT);
    buf.clear();
    let result = for_each_message(input, |index, msg| {
        let mut out = Output::new(buf, index);
        match msg {
            Ok(m) => f(&m, &mut out),
            Err(e) => out.error(e),
        }
    });
    match result {
        Ok(()) if buf.is_empty() => 0,
        Ok(()) => (((buf.as_ptr() as usize as u64) << 32) | buf.len() as u64) as i64,
        Err(e) => {
            log_str(Level::Error, &format!("malformed input batch ({} bytes): {}", len, e));
            -1
        }
    }
}

/// The output of the last `run_process` call (native tests).
#[cfg(not(target_arch = "wasm32"))]
pub fn last_output() -> Vec<u8> {
    // SAFETY: tests call this from the thread that ran run_process.
    unsafe { (*core::ptr::addr_of!(OUT)).clone() }
}
