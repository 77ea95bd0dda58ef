//! The runtime's own test material: a guest that misbehaves on request,
//! and a manifest for bundles holding it.

/// A guest written in WAT that implements the ABI. `ferry_preprocess`
/// dispatches on the first byte of the content type:
/// `o` ok (an empty tensor set), `l` loop forever, `m` grow memory without
/// bound, `f` try to open a file, `e` read the environment, `p` sleep 3 s in
/// WASI `poll_oneoff`, `t` trap.
pub const TEST_GUEST: &str = r#"
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $rptr (mut i32) (i32.const 0))
  (global $rlen (mut i32) (i32.const 0))
  (data (i32.const 64) "FTS1\00\00\00\00")
  (data (i32.const 80) "denied")
  (data (i32.const 96) "{}")
  (data (i32.const 112) "/etc/passwd")
  (func (export "ferry_abi_version") (result i32) (i32.const 1))
  (func (export "ferry_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "ferry_init") (param i32 i32) (result i32) (i32.const 0))
  (func $result (param i32 i32) (global.set $rptr (local.get 0)) (global.set $rlen (local.get 1)))
  (func (export "ferry_result_ptr") (result i32) (global.get $rptr))
  (func (export "ferry_result_len") (result i32) (global.get $rlen))
  (func (export "ferry_postprocess") (param i32 i32) (result i32)
    (call $result (i32.const 96) (i32.const 2)) (i32.const 0))
  (func (export "ferry_preprocess") (param $ct i32) (param $ctlen i32) (param $body i32) (param $len i32) (result i32)
    (local $c i32)
    (local.set $c (i32.load8_u (local.get $ct)))
    ;; o: ok
    (if (i32.eq (local.get $c) (i32.const 111)) (then
      (call $result (i32.const 64) (i32.const 8)) (return (i32.const 0))))
    ;; l: loop forever
    (if (i32.eq (local.get $c) (i32.const 108)) (then (loop $l (br $l))))
    ;; m: grow memory until stopped, ignoring failures
    (if (i32.eq (local.get $c) (i32.const 109)) (then
      (loop $l (drop (memory.grow (i32.const 16))) (br $l))))
    ;; f: every descriptor a path could be opened under must be refused
    (if (i32.eq (local.get $c) (i32.const 102)) (then
      (if (i32.eqz (call $prestat (i32.const 3) (i32.const 2048))) (then unreachable))
      (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 112) (i32.const 11)
                    (i32.const 0) (i64.const 2) (i64.const 2) (i32.const 0) (i32.const 2048)))
        (then unreachable))
      (call $result (i32.const 80) (i32.const 6)) (return (i32.const 2))))
    ;; p: sleep 3 s in WASI poll_oneoff (one relative monotonic-clock
    ;; subscription): a host call must not outlive the deadline. Answers ok
    ;; if the sleep happened, "denied" if the call was refused.
    (if (i32.eq (local.get $c) (i32.const 112)) (then
      (i64.store (i32.const 1024) (i64.const 0))
      (i64.store (i32.const 1032) (i64.const 0))
      (i64.store (i32.const 1040) (i64.const 1))
      (i64.store (i32.const 1048) (i64.const 3000000000))
      (i64.store (i32.const 1056) (i64.const 0))
      (i64.store (i32.const 1064) (i64.const 0))
      (if (i32.eqz (call $poll (i32.const 1024) (i32.const 1536) (i32.const 1) (i32.const 2000)))
        (then (call $result (i32.const 64) (i32.const 8)) (return (i32.const 0))))
      (call $result (i32.const 80) (i32.const 6)) (return (i32.const 2))))
    ;; e: environment and arguments must be empty
    (if (i32.eq (local.get $c) (i32.const 101)) (then
      (drop (call $env_sizes (i32.const 2048) (i32.const 2052)))
      (if (i32.load (i32.const 2048)) (then unreachable))
      (drop (call $args_sizes (i32.const 2048) (i32.const 2052)))
      (if (i32.load (i32.const 2048)) (then unreachable))
      (call $result (i32.const 80) (i32.const 6)) (return (i32.const 2))))
    unreachable)
)
"#;

pub use ferry_testkit::fixtures::minimal_manifest as manifest;
