//! Where log lines go: stderr, and nowhere when stderr cannot take them.
//!
//! A queue server must not stop because its log cannot be written: a full log disk, or a log
//! pipe whose reader went away (a journald restart, a killed `| tee`). tracing-subscriber
//! reports a failed write with `eprintln!`, which panics on the same stderr, and the panic
//! hook logs through the same writer again: the process aborted. Here a line that cannot be
//! written is dropped and counted (`agentq_log_lines_dropped_total`), and nothing else happens.
//! Boundary: knows stderr and tracing-subscriber's `MakeWriter`, nothing of the server.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped since the process started, because stderr refused them.
pub fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The log's writer, for `tracing_subscriber::fmt().with_writer(logs::Stderr)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

/// One log line on its way to stderr. The formatter hands it over in one write; whatever
/// stderr does with it, the write reports success.
pub struct Line;

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        say(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `text` to stderr whole, or drops it and counts it: for the log and for the few
/// plain lines the binary prints there itself (never `eprintln!`, which panics).
pub fn say(text: impl AsRef<[u8]>) {
    if io::stderr().lock().write_all(text.as_ref()).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}
