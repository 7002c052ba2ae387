//! The `onnx-repvgg` binary: parse arguments, run, print errors once. Exit codes: 0 success,
//! 1 error, 2 usage.

use std::process::ExitCode;

fn main() -> ExitCode {
    tune_allocator();
    // Interrupted (Ctrl-C, `timeout`, a closed terminal), leave no temporary file behind.
    if let Err(e) = onnx_repvgg::onnx::output::clean_up_on_signals() {
        eprintln!("onnx-repvgg: cannot watch for signals: {e}");
        return ExitCode::from(1);
    }
    ExitCode::from(onnx_repvgg::cli::main(std::env::args_os()))
}

/// glibc returns every freed block over 128 KiB to the kernel at once (unmapped, or trimmed off
/// the heap), so each new buffer of a fold is faulted in and zeroed page by page again: about a
/// third of the system time on big models. Keeping freed memory for reuse costs nothing here,
/// since the buffers are the same size run after run.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
