//! Logging through the host imports `flux.log_trace` .. `flux.log_error`.
//!
//! Use the macros [`trace!`](crate::trace) .. [`error!`](crate::error). Each call is a trip
//! through the host (microseconds): keep them off the per-message path at info level and above.
//! The host cuts messages longer than 4096 bytes.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[cfg(target_arch = "wasm32")]
mod imports {
    #[link(wasm_import_module = "flux")]
    extern "C" {
        pub fn log_trace(ptr: *const u8, len: usize);
        pub fn log_debug(ptr: *const u8, len: usize);
        pub fn log_info(ptr: *const u8, len: usize);
        pub fn log_warn(ptr: *const u8, len: usize);
        pub fn log_error(ptr: *const u8, len: usize);
    }
}

/// Logs `msg` at `level`. Only the imports a plugin actually uses end up in its module.
#[cfg(target_arch = "wasm32")]
pub fn log_str(level: Level, msg: &str) {
    let (p, n) = (msg.as_ptr(), msg.len());
    // SAFETY: the host reads `n` bytes at `p`, which is a live &str.
    unsafe {
        match level {
            Level::Trace => imports::log_trace(p, n),
            Level::Debug => imports::log_debug(p, n),
            Level::Info => imports::log_info(p, n),
            Level::Warn => imports::log_warn(p, n),
            Level::Error => imports::log_error(p, n),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
std::thread_local! {
    static CAPTURED: core::cell::RefCell<Vec<(Level, String)>> = core::cell::RefCell::new(Vec::new());
}

/// Native builds (unit tests of plugin logic): messages are kept; see [`take_logged`].
#[cfg(not(target_arch = "wasm32"))]
pub fn log_str(level: Level, msg: &str) {
    CAPTURED.with(|c| c.borrow_mut().push((level, msg.to_string())));
}

/// Native builds only: the messages logged on this thread so far (and forget them).
#[cfg(not(target_arch = "wasm32"))]
pub fn take_logged() -> Vec<(Level, String)> {
    CAPTURED.with(|c| core::mem::take(&mut *c.borrow_mut()))
}

/// Formats and logs; used by the macros.
pub fn log(level: Level, args: fmt::Arguments<'_>) {
    match args.as_str() {
        Some(s) => log_str(level, s),
        None => log_str(level, &fmt::format(args)),
    }
}

/// `trace!("read {} words", n)`: log at trace level (Python level 5).
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Trace, ::core::format_args!($($arg)+)) };
}

/// `debug!(...)`: log at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Debug, ::core::format_args!($($arg)+)) };
}

/// `info!(...)`: log at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Info, ::core::format_args!($($arg)+)) };
}

/// `warn!(...)`: log at warning level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Warn, ::core::format_args!($($arg)+)) };
}

/// `error!(...)`: log at error level. The last error logged during `flux_init` is what the
/// host reports when the config is refused.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::log($crate::log::Level::Error, ::core::format_args!($($arg)+)) };
}
