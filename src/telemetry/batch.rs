//! The log writer. A request's log line is appended to a shared buffer that one background thread
//! writes to stderr: logging costs a request a short lock and a copy, never a wait on a slow log
//! reader. The thread is woken only by the first line into an empty buffer and then sleeps
//! `FLUSH_EVERY` after each write, so under load there is one wake-up and one write per interval
//! instead of one per line, and an idle gateway never wakes it.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// The pause after each write, during which lines gather for the next one.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Lines beyond this many buffered bytes are dropped (and counted) rather than block a request:
/// only a stalled log reader fills it.
const MAX_BUFFERED: usize = 8 * 1024 * 1024;

/// The buffer the log lines go to (the log layer's writer borrows it).
#[derive(Default)]
pub struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    closing: bool,
}

/// The `MakeWriter` handed to the log layer.
#[derive(Clone)]
pub struct BatchWriter(Arc<Shared>);

/// Writes out what is buffered and stops the writer thread when dropped (at shutdown).
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn writer(out: impl Write + Send + 'static) -> std::io::Result<(BatchWriter, BatchGuard)> {
    let shared = Arc::new(Shared::default());
    let thread = std::thread::Builder::new()
        .name("portcullis-log".into())
        .spawn({
            let shared = shared.clone();
            move || write_out(&shared, out)
        })?;
    Ok((
        BatchWriter(shared.clone()),
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_out(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        let closing = {
            let mut state = shared.state.lock();
            if state.buf.is_empty() && !state.closing {
                shared.wake.wait(&mut state);
            }
            std::mem::swap(&mut state.buf, &mut spare);
            state.closing
        };
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "portcullis: {dropped} log lines dropped: the log reader is not keeping up"
            );
        }
        // A broken stderr loses the lines, never the gateway.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if closing {
            return;
        }
        // Lines arriving during the write wait for the next round: one write per interval.
        std::thread::sleep(FLUSH_EVERY);
    }
}

impl Write for &Shared {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = self.state.lock();
        if state.buf.len() + line.len() > MAX_BUFFERED {
            drop(state);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        let first = state.buf.is_empty();
        state.buf.extend_from_slice(line);
        drop(state);
        // Without a waiter (the writer is busy or pausing) this is a check, not a syscall.
        if first {
            self.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BatchWriter {
    /// Appends one whole line (the request log's own formatter writes here).
    pub fn write_line(&self, line: &[u8]) {
        let _ = (&*self.0).write(line);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = &'a Shared;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.state.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_and_all_are_out_when_the_guard_drops() {
        let sink = Sink::default();
        let (writer, guard) = writer(sink.clone()).unwrap();
        for i in 0..1000 {
            let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&writer);
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn a_stalled_reader_costs_lines_not_requests() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        struct Stalled(std::sync::mpsc::Receiver<()>, Sink);
        impl Write for Stalled {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let (writer, guard) = writer(Stalled(rx, sink.clone())).unwrap();
        let line = vec![b'x'; 1024];
        // Far more than the buffer holds, while the reader is stuck: every write returns at once.
        for _ in 0..(3 * MAX_BUFFERED / line.len()) {
            let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&writer);
            w.write_all(&line).unwrap();
        }
        drop(tx);
        drop(guard);
        let out = String::from_utf8(sink.0.lock().clone()).unwrap();
        assert!(out.contains("log lines dropped"), "the loss is reported");
    }
}
