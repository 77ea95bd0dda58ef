//! The WASI preview-1 functions a guest gets for real ([`super::WASI_LINKED`]),
//! implemented here over the guest's memory: no environment, no arguments,
//! no preopened directory, an empty stdin, stdout and stderr discarded, the
//! host's clocks and random numbers. Nothing here opens, reads or writes
//! anything outside the guest's memory, and nothing blocks.
//!
//! Why not wasmtime-wasi: its preview-1 layer is built on its preview-2
//! implementation, which brings wasmtime's component model, async support,
//! a file system and sockets into every binary (about 0.6 MB of the lean
//! device build, docs/PERFORMANCE.md); the guest uses none of them.
//! Semantics follow wasmtime-wasi's for the same situation (a non-terminal
//! stdio, no preopens), so guests behave as they did.
//!
//! Every pointer a guest passes is checked against its memory's bounds; an
//! out-of-bounds one gets `EFAULT` and nothing is written. Every other WASI
//! function a guest imports is linked to a stub that answers `ENOSYS`
//! (`stub_unlisted_wasi` in the parent module).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Extern, Linker};

use super::{StoreState, WASI_MODULE};

/// A WASI errno (preview 1's `errno` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Errno(pub i32);

impl Errno {
    const BADF: Errno = Errno(8);
    const FAULT: Errno = Errno(21);
    const INVAL: Errno = Errno(28);
    const SPIPE: Errno = Errno(70);
}

/// The descriptors a guest starts with: 0 (stdin), 1 (stdout), 2 (stderr),
/// until it closes them. No other descriptor ever exists.
#[derive(Debug)]
pub(super) struct Stdio {
    closed: [bool; 3],
    /// The origin of the monotonic clock: the store's creation.
    start: Instant,
}

impl Stdio {
    pub(super) fn new() -> Stdio {
        Stdio {
            closed: [false; 3],
            start: Instant::now(),
        }
    }

    /// Which standard stream `fd` is, if open.
    fn open(&self, fd: i32) -> Result<usize, Errno> {
        match usize::try_from(fd) {
            Ok(i) if i < 3 && !self.closed[i] => Ok(i),
            _ => Err(Errno::BADF),
        }
    }
}

/// Preview 1's `filetype::unknown`: what wasmtime-wasi reports for stdio
/// that is not a terminal.
const FILETYPE_UNKNOWN: u8 = 0;
/// `rights::fd_read` and `rights::fd_write`.
const RIGHT_FD_READ: u64 = 1 << 1;
const RIGHT_FD_WRITE: u64 = 1 << 6;
/// `clockid::realtime` and `clockid::monotonic` (the CPU-time clocks are
/// refused with `EBADF`, as wasmtime-wasi does).
const CLOCK_REALTIME: i32 = 0;
const CLOCK_MONOTONIC: i32 = 1;

/// The guest's memory, every access bounds-checked.
struct Memory<'a>(&'a mut [u8]);

impl Memory<'_> {
    fn range(&self, ptr: i32, len: u32) -> Result<std::ops::Range<usize>, Errno> {
        let start = ptr as u32 as usize;
        let end = start.checked_add(len as usize).ok_or(Errno::FAULT)?;
        if end > self.0.len() {
            return Err(Errno::FAULT);
        }
        Ok(start..end)
    }

    fn bytes_mut(&mut self, ptr: i32, len: u32) -> Result<&mut [u8], Errno> {
        let r = self.range(ptr, len)?;
        Ok(&mut self.0[r])
    }

    fn write(&mut self, ptr: i32, bytes: &[u8]) -> Result<(), Errno> {
        let len = u32::try_from(bytes.len()).map_err(|_| Errno::FAULT)?;
        self.bytes_mut(ptr, len)?.copy_from_slice(bytes);
        Ok(())
    }

    fn read_u32(&self, ptr: i32) -> Result<u32, Errno> {
        let r = self.range(ptr, 4)?;
        Ok(u32::from_le_bytes(self.0[r].try_into().unwrap()))
    }

    /// The lengths of a `ciovec`/`iovec` array (pointer, length pairs of
    /// u32), each buffer checked to lie in memory.
    fn iovec_lengths(&self, iovs: i32, count: i32) -> Result<Vec<u32>, Errno> {
        let count = count as u32;
        self.range(iovs, count.checked_mul(8).ok_or(Errno::FAULT)?)?;
        (0..count)
            .map(|i| {
                let at = (iovs as u32).wrapping_add(i * 8) as i32;
                let (buf, len) = (self.read_u32(at)?, self.read_u32(at.wrapping_add(4))?);
                self.range(buf as i32, len)?;
                Ok(len)
            })
            .collect()
    }
}

/// Runs `f` on the caller's exported memory and stdio state; its errno
/// (0 on success) is the WASI function's result. A guest without an
/// exported memory cannot call WASI (wasmtime-wasi traps too).
fn with_memory(
    caller: &mut Caller<'_, StoreState>,
    f: impl FnOnce(&mut Memory<'_>, &mut Stdio) -> Result<(), Errno>,
) -> wasmtime::Result<i32> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Err(wasmtime::Error::msg(
            "the guest called WASI without exporting its memory",
        ));
    };
    let (data, state) = memory.data_and_store_mut(caller);
    Ok(match f(&mut Memory(data), &mut state.stdio) {
        Ok(()) => 0,
        Err(Errno(e)) => e,
    })
}

/// Links every function of [`super::WASI_LINKED`].
pub(super) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    let m = WASI_MODULE;
    // Arguments and environment: none (two zero counts, nothing to copy).
    for name in ["args_sizes_get", "environ_sizes_get"] {
        linker.func_wrap(
            m,
            name,
            |mut c: Caller<'_, StoreState>, count: i32, size: i32| {
                with_memory(&mut c, |mem, _| {
                    mem.write(count, &0u32.to_le_bytes())?;
                    mem.write(size, &0u32.to_le_bytes())
                })
            },
        )?;
    }
    for name in ["args_get", "environ_get"] {
        linker.func_wrap(m, name, |_: Caller<'_, StoreState>, _: i32, _: i32| Ok(0))?;
    }
    linker.func_wrap(
        m,
        "clock_res_get",
        |mut c: Caller<'_, StoreState>, id: i32, out: i32| {
            with_memory(&mut c, |mem, _| match id {
                CLOCK_REALTIME | CLOCK_MONOTONIC => mem.write(out, &1u64.to_le_bytes()),
                2 | 3 => Err(Errno::BADF),
                _ => Err(Errno::INVAL),
            })
        },
    )?;
    linker.func_wrap(
        m,
        "clock_time_get",
        |mut c: Caller<'_, StoreState>, id: i32, _precision: i64, out: i32| {
            with_memory(&mut c, |mem, stdio| {
                let now = match id {
                    CLOCK_REALTIME => SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default(),
                    CLOCK_MONOTONIC => stdio.start.elapsed(),
                    2 | 3 => return Err(Errno::BADF),
                    _ => return Err(Errno::INVAL),
                };
                let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
                mem.write(out, &nanos.to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(m, "fd_close", |mut c: Caller<'_, StoreState>, fd: i32| {
        with_memory(&mut c, |_, stdio| {
            let i = stdio.open(fd)?;
            stdio.closed[i] = true;
            Ok(())
        })
    })?;
    linker.func_wrap(
        m,
        "fd_fdstat_get",
        |mut c: Caller<'_, StoreState>, fd: i32, out: i32| {
            with_memory(&mut c, |mem, stdio| {
                let rights = match stdio.open(fd)? {
                    0 => RIGHT_FD_READ,
                    _ => RIGHT_FD_WRITE,
                };
                // fdstat: filetype u8, flags u16 at 2, rights_base u64 at 8,
                // rights_inheriting u64 at 16.
                let mut stat = [0u8; 24];
                stat[0] = FILETYPE_UNKNOWN;
                stat[8..16].copy_from_slice(&rights.to_le_bytes());
                stat[16..24].copy_from_slice(&rights.to_le_bytes());
                mem.write(out, &stat)
            })
        },
    )?;
    // Flags belong to files; stdio has none to change (wasmtime-wasi: EBADF).
    linker.func_wrap(
        m,
        "fd_fdstat_set_flags",
        |_: Caller<'_, StoreState>, _fd: i32, _flags: i32| Ok(Errno::BADF.0),
    )?;
    linker.func_wrap(
        m,
        "fd_filestat_get",
        |mut c: Caller<'_, StoreState>, fd: i32, out: i32| {
            with_memory(&mut c, |mem, stdio| {
                stdio.open(fd)?;
                // filestat (64 bytes), all zero: filetype unknown at 16.
                mem.write(out, &[0u8; 64])
            })
        },
    )?;
    // No preopened directory: every descriptor answers EBADF.
    linker.func_wrap(
        m,
        "fd_prestat_get",
        |_: Caller<'_, StoreState>, _fd: i32, _out: i32| Ok(Errno::BADF.0),
    )?;
    linker.func_wrap(
        m,
        "fd_prestat_dir_name",
        |_: Caller<'_, StoreState>, _fd: i32, _path: i32, _len: i32| Ok(Errno::BADF.0),
    )?;
    linker.func_wrap(
        m,
        "fd_read",
        |mut c: Caller<'_, StoreState>, fd: i32, iovs: i32, count: i32, out: i32| {
            with_memory(&mut c, |mem, stdio| {
                if stdio.open(fd)? != 0 {
                    return Err(Errno::BADF);
                }
                mem.iovec_lengths(iovs, count)?;
                // stdin is empty: end of file at once.
                mem.write(out, &0u32.to_le_bytes())
            })
        },
    )?;
    linker.func_wrap(
        m,
        "fd_write",
        |mut c: Caller<'_, StoreState>, fd: i32, iovs: i32, count: i32, out: i32| {
            with_memory(&mut c, |mem, stdio| {
                if stdio.open(fd)? == 0 {
                    return Err(Errno::BADF);
                }
                // stdout and stderr are sinks: everything is "written". A
                // total past u32 is a short write, as POSIX allows.
                let written = mem
                    .iovec_lengths(iovs, count)?
                    .into_iter()
                    .try_fold(0u32, |sum, len| sum.checked_add(len).ok_or(sum))
                    .unwrap_or_else(|short| short);
                mem.write(out, &written.to_le_bytes())
            })
        },
    )?;
    // Streams do not seek.
    linker.func_wrap(
        m,
        "fd_seek",
        |mut c: Caller<'_, StoreState>, fd: i32, _offset: i64, _whence: i32, _out: i32| {
            with_memory(&mut c, |_, stdio| {
                stdio.open(fd)?;
                Err(Errno::SPIPE)
            })
        },
    )?;
    linker.func_wrap(
        m,
        "fd_tell",
        |mut c: Caller<'_, StoreState>, fd: i32, _out: i32| {
            with_memory(&mut c, |_, stdio| {
                stdio.open(fd)?;
                Err(Errno::SPIPE)
            })
        },
    )?;
    // Ends the guest's call with a trap naming the status: an instance that
    // exited is not reused.
    linker.func_wrap(
        m,
        "proc_exit",
        |_: Caller<'_, StoreState>, status: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "the guest exited with status {status}"
            )))
        },
    )?;
    linker.func_wrap(
        m,
        "random_get",
        |mut c: Caller<'_, StoreState>, buf: i32, len: i32| {
            with_memory(&mut c, |mem, _| {
                let bytes = mem.bytes_mut(buf, len as u32)?;
                getrandom::fill(bytes).map_err(|_| Errno(29)) // EIO
            })
        },
    )?;
    linker.func_wrap(m, "sched_yield", |_: Caller<'_, StoreState>| Ok(0))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovecs_outside_memory_are_a_fault() {
        let mut data = vec![0u8; 64];
        // One iovec at 0: buffer at 32, length 16 (inside).
        data[0..4].copy_from_slice(&32u32.to_le_bytes());
        data[4..8].copy_from_slice(&16u32.to_le_bytes());
        // One at 8: buffer at 60, length 8 (past the end).
        data[8..12].copy_from_slice(&60u32.to_le_bytes());
        data[12..16].copy_from_slice(&8u32.to_le_bytes());
        let mem = Memory(&mut data);
        assert_eq!(mem.iovec_lengths(0, 1), Ok(vec![16]));
        assert_eq!(mem.iovec_lengths(0, 2), Err(Errno::FAULT));
        // The array itself past the end, or wrapping around.
        assert_eq!(mem.iovec_lengths(60, 1), Err(Errno::FAULT));
        assert_eq!(mem.iovec_lengths(0, i32::MAX), Err(Errno::FAULT));
        assert_eq!(mem.iovec_lengths(-8, 1), Err(Errno::FAULT));
    }

    #[test]
    fn only_open_standard_streams_exist() {
        let mut s = Stdio::new();
        assert_eq!(s.open(1), Ok(1));
        assert_eq!(s.open(3), Err(Errno::BADF));
        assert_eq!(s.open(-1), Err(Errno::BADF));
        s.closed[1] = true;
        assert_eq!(s.open(1), Err(Errno::BADF));
    }
}
