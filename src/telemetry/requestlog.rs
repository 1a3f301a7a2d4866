//! The request log line, formatted by its own code into a reused buffer. Every call writes this
//! line, and `tracing`'s formatter spent a tenth of a proxied call's instructions and three
//! allocations on it. The bytes are the ones `tracing_subscriber::fmt` writes for the same event,
//! in text and in JSON; the tests below compare the two, escaping included. Other lines stay with
//! `tracing`. The line follows the log filter (`RUST_LOG`) like any event of its target.
//! On a terminal the text line has no colours.

use std::cell::RefCell;
use std::fmt::{self, Display};
use std::io::{self, Write as _};
use std::sync::OnceLock;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

use super::batch::BatchWriter;

/// The target the line has always had (log filters name it).
pub const TARGET: &str = "portcullis::dataplane::observe";

/// One finished request, as logged. `None` fields are left out, as `tracing` leaves them out.
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub surface: &'a str,
    pub route: &'a str,
    pub provider: &'a str,
    pub consumer: &'a str,
    pub backend: Option<&'a str>,
    pub attempts: Option<u32>,
    pub status: u16,
    pub latency_ms: f64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cost_usd: Option<&'a dyn Display>,
    pub cache: Option<&'a str>,
    /// `semantic` for a hit on a similar prompt's entry.
    pub cache_match: Option<&'a str>,
    pub guardrail: Option<&'a str>,
}

struct Sink {
    json: bool,
    out: BatchWriter,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends request lines to `out` (the log layer's writer), in JSON or text.
pub(super) fn install(json: bool, out: BatchWriter) {
    let _ = SINK.set(Sink { json, out });
}

/// Logs `line`, unless the filter turns the target's INFO lines off (or logging is not set up).
pub fn log(line: &RequestLine<'_>) {
    let Some(sink) = SINK.get() else { return };
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    thread_local! {
        static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    }
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        let written = if sink.json {
            json(buf, line)
        } else {
            text(buf, line)
        };
        if written.is_ok() {
            sink.out.write_line(buf);
        }
    });
}

/// The field values in the event's order, for both formats.
enum Value<'a> {
    Str(&'a str),
    Display(&'a dyn Display),
    U64(u64),
    F64(f64),
}

fn fields<'a>(l: &'a RequestLine<'a>) -> [(&'static str, Option<Value<'a>>); 17] {
    use Value::*;
    [
        ("request_id", Some(Str(l.request_id))),
        ("method", Some(Display(&l.method))),
        ("path", Some(Str(l.path))),
        ("surface", Some(Str(l.surface))),
        ("route", Some(Str(l.route))),
        ("provider", Some(Str(l.provider))),
        ("consumer", Some(Str(l.consumer))),
        ("backend", l.backend.map(Str)),
        ("attempts", l.attempts.map(|n| U64(n.into()))),
        ("status", Some(U64(l.status.into()))),
        ("latency_ms", Some(F64(l.latency_ms))),
        ("prompt_tokens", l.prompt_tokens.map(U64)),
        ("completion_tokens", l.completion_tokens.map(U64)),
        ("cost_usd", l.cost_usd.map(Display)),
        ("cache", l.cache.map(Str)),
        ("cache_match", l.cache_match.map(Str)),
        ("guardrail", l.guardrail.map(Str)),
    ]
}

/// `tracing_subscriber`'s full text format without colours: strings are `Debug`-quoted.
fn text(buf: &mut Vec<u8>, l: &RequestLine<'_>) -> io::Result<()> {
    timestamp(buf)?;
    buf.extend_from_slice(b"  INFO ");
    buf.extend_from_slice(TARGET.as_bytes());
    buf.extend_from_slice(b": request");
    for (name, value) in fields(l) {
        let Some(value) = value else { continue };
        buf.push(b' ');
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        match value {
            Value::Str(s) => debug_str(buf, s)?,
            Value::Display(d) => write!(buf, "{d}")?,
            Value::U64(n) => write!(buf, "{n}")?,
            Value::F64(x) => write!(buf, "{x:?}")?,
        }
    }
    buf.push(b'\n');
    Ok(())
}

/// `{:?}` of a string: quoted, escaped as Rust escapes it. Names, paths and ids are nearly always
/// printable ASCII without quotes or backslashes, which `Debug` writes as they are: copied here
/// without the formatter's character-by-character escaping.
fn debug_str(buf: &mut Vec<u8>, s: &str) -> io::Result<()> {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
        Ok(())
    } else {
        write!(buf, "{s:?}")
    }
}

/// `tracing_subscriber`'s JSON format with the event's fields flattened: serde_json's own
/// escaping and number formatting, `Display` values as strings.
fn json(buf: &mut Vec<u8>, l: &RequestLine<'_>) -> io::Result<()> {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(buf)?;
    buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
    for (name, value) in fields(l) {
        let Some(value) = value else { continue };
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\":");
        match value {
            Value::Str(s) => serde_json::to_writer(&mut *buf, s)?,
            Value::Display(d) => serde_json::to_writer(&mut *buf, &format_args!("{d}"))?,
            Value::U64(n) => write!(buf, "{n}")?,
            Value::F64(x) => serde_json::to_writer(&mut *buf, &x)?,
        }
    }
    writeln!(buf, ",\"target\":\"{TARGET}\"}}")
}

/// The time as `tracing_subscriber` writes it (its own timer, so the two cannot drift).
fn timestamp(buf: &mut Vec<u8>) -> io::Result<()> {
    struct Utf8<'a>(&'a mut Vec<u8>);
    impl fmt::Write for Utf8<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
    SystemTime
        .format_time(&mut Writer::new(&mut Utf8(buf)))
        .map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use proptest::prelude::*;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// What `tracing_subscriber` writes for the line, configured as `telemetry::init` does.
    fn reference(json: bool, l: &RequestLine<'_>) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let make = move || Capture(sink.clone());
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(make);
        let subscriber = tracing_subscriber::registry();
        let dispatch = if json {
            let layer = layer
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false);
            tracing::Dispatch::new(subscriber.with(layer))
        } else {
            tracing::Dispatch::new(subscriber.with(layer))
        };
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(
                target: TARGET,
                request_id = l.request_id,
                method = %l.method,
                path = l.path,
                surface = l.surface,
                route = l.route,
                provider = l.provider,
                consumer = l.consumer,
                backend = l.backend,
                attempts = l.attempts,
                status = l.status,
                latency_ms = l.latency_ms,
                prompt_tokens = l.prompt_tokens,
                completion_tokens = l.completion_tokens,
                cost_usd = l.cost_usd.map(tracing::field::display),
                cache = l.cache,
                cache_match = l.cache_match,
                guardrail = l.guardrail,
                "request"
            );
        });
        let bytes = out.lock().clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn ours(json: bool, l: &RequestLine<'_>) -> String {
        let mut buf = Vec::new();
        if json {
            super::json(&mut buf, l).expect("json");
        } else {
            text(&mut buf, l).expect("text");
        }
        String::from_utf8(buf).expect("utf-8")
    }

    /// The line with its timestamp (the first 27 characters of the time) blanked.
    fn untimed(line: &str) -> String {
        let at = line.find("20").unwrap_or(0);
        let mut s = line.to_string();
        s.replace_range(at..at + 27, "T");
        s
    }

    fn same(l: &RequestLine<'_>) {
        for json in [false, true] {
            let (want, got) = (reference(json, l), ours(json, l));
            assert_eq!(untimed(&got), untimed(&want), "json: {json}");
        }
    }

    fn line<'a>(s: &'a [String; 6], cost: Option<&'a dyn Display>) -> RequestLine<'a> {
        RequestLine {
            request_id: &s[0],
            method: "POST",
            path: &s[1],
            surface: "openai",
            route: &s[2],
            provider: "openai",
            consumer: &s[3],
            backend: Some(&s[4]),
            attempts: Some(2),
            status: 200,
            latency_ms: 882.2115630000001,
            prompt_tokens: Some(5),
            completion_tokens: Some(20),
            cost_usd: cost,
            cache: Some("hit"),
            cache_match: Some("semantic"),
            guardrail: Some(&s[5]),
        }
    }

    #[test]
    fn a_full_line_and_a_bare_one_are_what_tracing_writes() {
        let s = [
            "pc-000053f7-2",
            "/v1/chat/completions",
            "chat",
            "",
            "openai/gpt-4o",
            "p/c:mask:request",
        ]
        .map(String::from);
        let cost = crate::cost::Usd(12_750_000);
        same(&line(&s, Some(&cost)));
        same(&RequestLine {
            request_id: "x",
            method: "GET",
            path: "/nope",
            surface: "other",
            route: "",
            provider: "",
            consumer: "",
            backend: None,
            attempts: None,
            status: 404,
            latency_ms: 0.0123,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            cache: None,
            cache_match: None,
            guardrail: None,
        });
    }

    proptest! {
        /// Whatever a caller puts in a path or an id (quotes, controls, escapes, any Unicode),
        /// both formats escape it exactly as `tracing` does.
        #[test]
        fn any_text_is_escaped_as_tracing_escapes_it(
            s in proptest::array::uniform6(any::<String>()),
            latency in any::<f64>(),
            tokens in any::<u64>(),
        ) {
            let unknown = "unknown";
            let mut l = line(&s, Some(&unknown));
            l.latency_ms = latency;
            l.completion_tokens = Some(tokens);
            same(&l);
        }

        /// Printable ASCII, quotes and backslashes included (the copied fast path and its edges).
        #[test]
        fn ascii_names_and_paths_are_written_as_tracing_writes_them(
            s in proptest::array::uniform6("[ -~]{0,24}"),
        ) {
            same(&line(&s, None));
        }
    }
}
