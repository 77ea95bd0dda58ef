//! The exports of `docs/guest-abi.md` (compiled for `wasm32` only).
//!
//! Everything here is glue: host bytes in, [`Guest`] called, result bytes out. State lives in
//! thread-locals (a WASM instance is single-threaded): the input buffer handed out by
//! `ferry_alloc`, the configured guest, and the last call's result.

use std::cell::RefCell;

use ferry_guest_abi::{ABI_VERSION, STATUS_OK};

use crate::error::{Error, bad, internal};
use crate::guest::Guest;

/// Capacity `ferry_alloc` keeps between calls even when a smaller buffer is asked for; above
/// it, a buffer four times larger than needed is given back, so one large request does not pin
/// its memory for the life of the instance.
const KEEP_CAPACITY: usize = 1 << 20;

/// Bytes in a WASM page.
const PAGE: usize = 65_536;

thread_local! {
    /// The buffer the host writes inputs into.
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The configured guest, once `ferry_init` succeeds.
    static GUEST: RefCell<Option<Guest>> = const { RefCell::new(None) };
    /// The result of the last call: a tensor set, a JSON response or an error message.
    static RESULT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The ABI version this guest speaks.
#[unsafe(no_mangle)]
pub extern "C" fn ferry_abi_version() -> i32 {
    ABI_VERSION
}

/// A buffer of `len` writable bytes, valid until the next `ferry_alloc`; 0 if it cannot be had.
/// Its bytes are what an earlier input left there (or zeros): the host overwrites all `len`.
#[unsafe(no_mangle)]
pub extern "C" fn ferry_alloc(len: i32) -> i32 {
    let Ok(len) = usize::try_from(len) else {
        return 0;
    };
    INPUT.with_borrow_mut(|buf| {
        if buf.capacity() > KEEP_CAPACITY && buf.capacity() / 4 > len {
            *buf = Vec::new();
        }
        // The buffer keeps the length of the largest input since it was last
        // shrunk: bytes are zeroed once, when the buffer grows, not on every
        // call (a 600 KB image tensor was zeroed just to be overwritten).
        if buf.len() < len {
            if buf.try_reserve_exact(len - buf.len()).is_err() {
                return 0;
            }
            buf.resize(len, 0);
        }
        buf.as_mut_ptr() as usize as i32
    })
}

/// Configures the guest from the JSON at `ptr..ptr+len`.
///
/// # Safety
/// The range must be bytes the host wrote into a buffer from `ferry_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_init(ptr: i32, len: i32) -> i32 {
    // SAFETY: the caller's contract.
    let config = unsafe { host_bytes(ptr, len) };
    finish(config.and_then(Guest::from_config).map(|guest| {
        GUEST.set(Some(guest));
        Vec::new()
    }))
}

/// Preprocesses a request: content type at `ct_ptr..+ct_len`, body at `body_ptr..+body_len`.
///
/// # Safety
/// Both ranges must be bytes the host wrote into a buffer from `ferry_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_preprocess(
    ct_ptr: i32,
    ct_len: i32,
    body_ptr: i32,
    body_len: i32,
) -> i32 {
    // SAFETY: the caller's contract.
    let inputs = unsafe {
        host_bytes(ct_ptr, ct_len).and_then(|ct| Ok((ct, host_bytes(body_ptr, body_len)?)))
    };
    finish(inputs.and_then(|(ct, body)| {
        let ct = std::str::from_utf8(ct).map_err(|_| bad("the content type is not UTF-8"))?;
        with_guest(|g| g.preprocess(ct, body))
    }))
}

/// Postprocesses the model's outputs (a tensor set at `ptr..ptr+len`).
///
/// # Safety
/// The range must be bytes the host wrote into a buffer from `ferry_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_postprocess(ptr: i32, len: i32) -> i32 {
    // SAFETY: the caller's contract.
    let outputs = unsafe { host_bytes(ptr, len) };
    finish(outputs.and_then(|bytes| with_guest(|g| g.postprocess(bytes))))
}

/// Where the last call's result starts.
#[unsafe(no_mangle)]
pub extern "C" fn ferry_result_ptr() -> i32 {
    RESULT.with_borrow(|r| r.as_ptr() as usize as i32)
}

/// The last call's result's length in bytes.
#[unsafe(no_mangle)]
pub extern "C" fn ferry_result_len() -> i32 {
    RESULT.with_borrow(|r| r.len() as i32)
}

/// The host's bytes at `ptr..ptr+len`, after checking the range lies in linear memory (a bad
/// range is a status-2 error, not a trap).
///
/// # Safety
/// The range must not overlap memory Rust code mutates while the slice lives: the host's
/// buffers come from `ferry_alloc`, which nothing else touches during a call.
unsafe fn host_bytes<'a>(ptr: i32, len: i32) -> Result<&'a [u8], Error> {
    let start = ptr as u32 as usize;
    let len = usize::try_from(len).map_err(|_| internal(format!("negative length {len}")))?;
    if len == 0 {
        return Ok(&[]);
    }
    let memory = core::arch::wasm32::memory_size(0).saturating_mul(PAGE);
    match start.checked_add(len) {
        Some(end) if start != 0 && end <= memory => {
            // SAFETY: in bounds of linear memory and non-null; aliasing per the caller's contract.
            Ok(unsafe { std::slice::from_raw_parts(start as *const u8, len) })
        }
        _ => Err(internal(format!(
            "the range {start}+{len} is outside the guest's memory"
        ))),
    }
}

fn with_guest(f: impl FnOnce(&mut Guest) -> Result<Vec<u8>, Error>) -> Result<Vec<u8>, Error> {
    GUEST.with_borrow_mut(|g| match g {
        Some(g) => f(g),
        None => Err(internal(
            "the guest is not configured: ferry_init has not succeeded",
        )),
    })
}

/// Stores a call's result and returns its status.
fn finish(outcome: Result<Vec<u8>, Error>) -> i32 {
    let (status, bytes) = match outcome {
        Ok(bytes) => (STATUS_OK, bytes),
        Err(e) => (e.status(), e.into_message().into_bytes()),
    };
    RESULT.set(bytes);
    status
}
