//! Tests that read what was logged: [`capture`] collects the log lines this thread writes
//! while the returned [`Capture`] is held (a current-thread test runtime).

use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines written while it is held.
pub struct Capture {
    lines: Lines,
    _guard: tracing::subscriber::DefaultGuard,
    _second: tracing::Dispatch,
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.0.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned()
    }
}

pub fn capture() -> Capture {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // While a single subscriber exists, tracing computes a callsite's interest against the
    // registering thread's subscriber alone: another test's thread meeting a span or event
    // first (with none) would turn it off for this one. With a second one alive, every
    // callsite's interest is computed against all of them, whichever thread meets it first.
    let second = tracing::Dispatch::new(tracing_subscriber::registry());
    let guard = tracing::subscriber::set_default(subscriber);
    Capture {
        lines,
        _guard: guard,
        _second: second,
    }
}
