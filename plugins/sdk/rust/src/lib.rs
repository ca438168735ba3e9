//! Guest-side SDK for flux-edge WebAssembly plugins, ABI v1 (docs/plugin-abi.md).
//!
//! A plugin is a `cdylib` crate built for `wasm32-unknown-unknown`. It writes two plain
//! functions and lets [`flux_plugin!`] generate the five exports of the ABI:
//!
//! ```ignore
//! use flux_plugin_sdk::{flux_plugin, Message, Output};
//!
//! fn init(_config: &[u8]) {}
//!
//! fn process(msg: &Message, out: &mut Output) {
//!     for (i, word) in msg.registers().enumerate() {
//!         out.measurement(&format!("r{}", msg.address as usize + i), f64::from(word) * 0.1, "°C");
//!     }
//! }
//!
//! flux_plugin! { init: init, process: process }
//! ```
//!
//! The forms of the macro:
//!
//! | form | init signature | process signature |
//! |---|---|---|
//! | `{ process: p }` | (accepts any config) | `fn(&Message, &mut Output) -> R` |
//! | `{ init: i, process: p }` | `fn(&[u8]) -> I` | `fn(&Message, &mut Output) -> R` |
//! | `{ init_json: i, process: p }` (feature `json`) | `fn(&serde_json::Value) -> I` | same |
//! | `{ state: T, init: i, process: p }` | `fn(&[u8]) -> Result<T, E>` | `fn(&mut T, &Message, &mut Output) -> R` |
//! | `{ state: T, init_json: i, process: p }` (feature `json`) | `fn(&serde_json::Value) -> Result<T, E>` | same |
//!
//! With the `json` feature a stateful plugin may also answer `wasm` actions (the optional
//! `flux_act` export): add `act: a` after `process: p`, or give `act: a` instead of
//! `process: p` for a plugin that only acts. `a` is `fn(&mut T, &Command) -> Result<Vec<u8>,
//! String>`: the bytes to send, or the reason to refuse the command (logged at error level).
//!
//! `I` is `()` or `Result<(), E>`, `R` is `()` or `Result<(), E>`, with `E: Display`. An init
//! error is logged at error level and refuses the config (`flux_init` returns 1); a process
//! error becomes an error line for that message. A panic aborts: the call traps and the host
//! turns the batch into error records (build with `panic = "abort"`).

#[cfg(feature = "json")]
pub mod act;
pub mod log;
pub mod message;
pub mod output;
#[doc(hidden)]
pub mod rt;

/// The ABI version `flux_abi_version` returns.
pub const ABI_VERSION: i32 = 1;

pub use message::{Message, Registers, FN_COIL, FN_DISCRETE, FN_HOLDING, FN_INPUT, KIND_BYTES, KIND_MEASUREMENT, KIND_REGISTERS};
pub use output::{Key, Output, Quality, Value};

#[cfg(feature = "json")]
pub use act::Command;
#[cfg(feature = "json")]
pub use serde_json;

#[doc(hidden)]
pub mod __rt {
    #[cfg(feature = "json")]
    pub use crate::act::run_act;
    pub use crate::rt::*;
}

/// Everything a plugin usually needs: `use flux_plugin_sdk::prelude::*;`
pub mod prelude {
    pub use crate::{debug, error, flux_plugin, info, trace, warn};
    pub use crate::{Key, Message, Output, Quality, Value};
}

/// Generates the ABI exports (`flux_abi_version`, `flux_alloc`, `flux_dealloc`, `flux_init`,
/// `flux_process`) from plain functions. See the crate documentation for the forms.
#[macro_export]
macro_rules! flux_plugin {
    (@common) => {
        #[no_mangle]
        pub extern "C" fn flux_abi_version() -> i32 {
            $crate::ABI_VERSION
        }

        #[no_mangle]
        pub extern "C" fn flux_alloc(size: usize) -> *mut u8 {
            unsafe { $crate::__rt::alloc(size) }
        }

        #[no_mangle]
        pub extern "C" fn flux_dealloc(ptr: *mut u8, size: usize) {
            unsafe { $crate::__rt::dealloc(ptr, size) }
        }
    };

    (@stateless $init:expr, $process:expr) => {
        $crate::flux_plugin!(@common);

        #[no_mangle]
        pub extern "C" fn flux_init(ptr: *const u8, len: usize) -> i32 {
            unsafe { $crate::__rt::run_init(ptr, len, $init) }
        }

        #[no_mangle]
        pub extern "C" fn flux_process(ptr: *const u8, len: usize) -> i64 {
            unsafe {
                $crate::__rt::run_process(ptr, len, |m, o| {
                    let r = ($process)(m, o);
                    $crate::__rt::ProcessResult::report(r, o)
                })
            }
        }
    };

    (@act $act:expr) => {
        #[no_mangle]
        pub extern "C" fn flux_act(ptr: *const u8, len: usize) -> i64 {
            unsafe {
                $crate::__rt::run_act(ptr, len, |cmd| {
                    match (*::core::ptr::addr_of_mut!(__FLUX_PLUGIN_STATE)).as_mut() {
                        ::core::option::Option::Some(state) => ($act)(state, cmd),
                        ::core::option::Option::None => ::core::result::Result::Err(::std::string::String::from(
                            "plugin is not initialised (flux_init was not called or refused its config)",
                        )),
                    }
                })
            }
        }
    };

    (@stateful_init $t:ty, $init:expr) => {
        static mut __FLUX_PLUGIN_STATE: ::core::option::Option<$t> = ::core::option::Option::None;

        $crate::flux_plugin!(@common);

        #[no_mangle]
        pub extern "C" fn flux_init(ptr: *const u8, len: usize) -> i32 {
            unsafe {
                $crate::__rt::run_init(ptr, len, |cfg: &[u8]| {
                    let state: $t = ($init)(cfg)?;
                    *::core::ptr::addr_of_mut!(__FLUX_PLUGIN_STATE) = ::core::option::Option::Some(state);
                    Ok(())
                })
            }
        }
    };

    (@stateful $t:ty, $init:expr, $process:expr) => {
        $crate::flux_plugin!(@stateful_init $t, $init);

        #[no_mangle]
        pub extern "C" fn flux_process(ptr: *const u8, len: usize) -> i64 {
            unsafe {
                $crate::__rt::run_process(ptr, len, |m, o| {
                    match (*::core::ptr::addr_of_mut!(__FLUX_PLUGIN_STATE)).as_mut() {
                        ::core::option::Option::Some(state) => {
                            let r = ($process)(state, m, o);
                            $crate::__rt::ProcessResult::report(r, o)
                        }
                        ::core::option::Option::None => o.error("plugin is not initialised (flux_init was not called or refused its config)"),
                    }
                })
            }
        }
    };

    (process: $process:expr $(,)?) => {
        $crate::flux_plugin!(@stateless |_cfg: &[u8]| -> Result<(), String> { Ok(()) }, $process);
    };

    (init: $init:expr, process: $process:expr $(,)?) => {
        $crate::flux_plugin!(@stateless |cfg: &[u8]| $crate::__rt::InitResult::into_init_result(($init)(cfg)), $process);
    };

    (init_json: $init:expr, process: $process:expr $(,)?) => {
        $crate::flux_plugin!(@stateless |cfg: &[u8]| -> Result<(), String> {
            let value = $crate::__rt::parse_json(cfg)?;
            $crate::__rt::InitResult::into_init_result(($init)(&value))
        }, $process);
    };

    (state: $t:ty, init: $init:expr, process: $process:expr $(,)?) => {
        $crate::flux_plugin!(@stateful $t, |cfg: &[u8]| $crate::__rt::state_result(($init)(cfg)), $process);
    };

    (state: $t:ty, init: $init:expr, process: $process:expr, act: $act:expr $(,)?) => {
        $crate::flux_plugin!(state: $t, init: $init, process: $process);
        $crate::flux_plugin!(@act $act);
    };

    (state: $t:ty, init_json: $init:expr, process: $process:expr, act: $act:expr $(,)?) => {
        $crate::flux_plugin!(state: $t, init_json: $init, process: $process);
        $crate::flux_plugin!(@act $act);
    };

    (state: $t:ty, init: $init:expr, act: $act:expr $(,)?) => {
        $crate::flux_plugin!(@stateful_init $t, |cfg: &[u8]| $crate::__rt::state_result(($init)(cfg)));
        $crate::flux_plugin!(@act $act);
    };

    (state: $t:ty, init_json: $init:expr, act: $act:expr $(,)?) => {
        $crate::flux_plugin!(@stateful_init $t, |cfg: &[u8]| -> Result<$t, String> {
            let value = $crate::__rt::parse_json(cfg)?;
            $crate::__rt::state_result(($init)(&value))
        });
        $crate::flux_plugin!(@act $act);
    };

    (state: $t:ty, init_json: $init:expr, process: $process:expr $(,)?) => {
        $crate::flux_plugin!(@stateful $t, |cfg: &[u8]| -> Result<$t, String> {
            let value = $crate::__rt::parse_json(cfg)?;
            $crate::__rt::state_result(($init)(&value))
        }, $process);
    };
}

#[cfg(test)]
mod tests;
