//! Where the guest's serial output goes.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// The UART's destination.
pub enum Output {
    /// The process's stdout.
    Stdout,
    /// An in-memory buffer (tests, embedding).
    Capture(Capture),
    /// Dropped.
    Null,
}

impl Output {
    pub(crate) fn into_writer(self) -> Box<dyn Write + Send> {
        match self {
            Output::Stdout => Box::new(io::stdout()),
            Output::Capture(c) => Box::new(c),
            Output::Null => Box::new(io::sink()),
        }
    }
}

/// A shareable in-memory writer.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
