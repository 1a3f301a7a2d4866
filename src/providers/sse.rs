//! Incremental stream framings fed with bytes split anywhere: Server-Sent Events (WHATWG framing)
//! and newline-delimited JSON, plus the decoder shell every SSE-speaking provider shares.
//!
//! Both framings are bounded and linear: each byte received is examined once (a partial line is
//! kept, never rescanned), and a line, event or JSON value larger than the frame limit fails the
//! stream instead of growing a buffer without end.

use super::{ProviderError, StreamDecoder};
use crate::llm::StreamDelta;

/// The default largest stream event (SSE event, NDJSON line, event-stream frame): 1 MiB. Real
/// events are token deltas of a few hundred bytes and whole-message events of tens of KiB, so
/// this leaves a thousandfold margin while bounding what one stream can make the gateway buffer.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// The error for a frame over the limit; the data plane answers it with 502.
pub fn frame_too_large(what: &str, max: usize) -> ProviderError {
    ProviderError::MalformedResponse(format!(
        "a stream {what} is larger than the limit of {max} bytes"
    ))
}

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The event as it was framed on the wire, for native streams that pass it on as is.
    pub fn raw(&self) -> bytes::Bytes {
        let mut raw = bytes::BytesMut::with_capacity(self.data.len() + 16);
        if let Some(name) = &self.event {
            raw.extend_from_slice(b"event: ");
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(b"\n");
        }
        for line in self.data.split('\n') {
            raw.extend_from_slice(b"data: ");
            raw.extend_from_slice(line.as_bytes());
            raw.extend_from_slice(b"\n");
        }
        raw.extend_from_slice(b"\n");
        raw.freeze()
    }
}

/// One native event's delta: its `raw` bytes with what the translating decoder counted from it
/// (text, tool calls, usage, the end), for the gateway's metering.
pub fn merged(parsed: Vec<StreamDelta>, raw: Option<bytes::Bytes>) -> StreamDelta {
    let mut merged = StreamDelta {
        raw,
        ..Default::default()
    };
    for d in parsed {
        if let Some(text) = d.text {
            merged.text.get_or_insert_default().push_str(&text);
        }
        merged.tool_calls.extend(d.tool_calls);
        merged.usage = d.usage.or(merged.usage);
        merged.finish_reason = d.finish_reason.or(merged.finish_reason);
    }
    merged
}

#[derive(Debug)]
pub struct SseParser {
    /// The current line so far, without its terminator.
    partial: Vec<u8>,
    /// The last byte seen was a '\r': a '\n' right after it ends nothing more.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
    /// Gemini may send an error after HTTP 200 as bare (often multi-line) JSON, without `data:`.
    bare_json: bool,
    bare: String,
    depth: JsonDepth,
    max: usize,
    /// Bytes examined so far (each received byte once).
    scanned: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser {
            partial: Vec::new(),
            after_cr: false,
            event: None,
            data: None,
            bare_json: false,
            bare: String::new(),
            depth: JsonDepth::default(),
            max: DEFAULT_MAX_FRAME,
            scanned: 0,
        }
    }
}

impl SseParser {
    /// A parser that also delivers bare JSON objects between events, as data-only events.
    pub fn with_bare_json() -> Self {
        SseParser {
            bare_json: true,
            ..Default::default()
        }
    }

    pub fn set_max_frame(&mut self, max: usize) {
        self.max = max;
    }

    /// Bytes examined so far; equal to the bytes fed, since nothing is scanned twice.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    /// Appends complete events found in `bytes` to `out`; keeps any partial line for the next call.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), ProviderError> {
        let mut rest = bytes;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some((b'\n', tail)) = rest.split_first() {
                self.scanned += 1;
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.scanned += end as u64 + 1;
            self.append(&rest[..end])?;
            let line = std::mem::take(&mut self.partial);
            self.line(&String::from_utf8_lossy(&line), out)?;
            // Keep the allocation for the next line.
            self.partial = line;
            self.partial.clear();
            let cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if cr {
                match rest.split_first() {
                    Some((b'\n', tail)) => {
                        self.scanned += 1;
                        rest = tail;
                    }
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.scanned += rest.len() as u64;
        self.append(rest)
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), ProviderError> {
        if self.partial.len() + bytes.len() > self.max {
            return Err(frame_too_large("line", self.max));
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// End of stream: a final event without its blank line is still delivered, and so is an
    /// unfinished bare JSON text (its parse error then reports the truncation).
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), ProviderError> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&String::from_utf8_lossy(&line), out)?;
        }
        self.dispatch(out);
        if !self.bare.is_empty() {
            self.depth = JsonDepth::default();
            out.push(SseEvent {
                event: None,
                data: std::mem::take(&mut self.bare),
            });
        }
        Ok(())
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) -> Result<(), ProviderError> {
        if self.bare_json && (!self.bare.is_empty() || line.trim_start().starts_with('{')) {
            if self.bare.len() + line.len() + 1 > self.max {
                return Err(frame_too_large("JSON value", self.max));
            }
            self.bare.push_str(line);
            self.bare.push('\n');
            // Depth is tracked as lines arrive, so a long multi-line value is not re-parsed per line.
            if self.depth.feed(line) {
                self.depth = JsonDepth::default();
                out.push(SseEvent {
                    event: None,
                    data: std::mem::take(&mut self.bare),
                });
            }
            return Ok(());
        }
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    if d.len() + value.len() + 1 > self.max {
                        return Err(frame_too_large("event", self.max));
                    }
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if let Some(data) = self.data.take() {
            out.push(SseEvent { event, data });
        }
    }
}

/// Nesting depth of a JSON text read line by line: enough to see where a bare value ends.
#[derive(Debug, Default)]
struct JsonDepth {
    depth: u64,
    started: bool,
    in_string: bool,
    escaped: bool,
}

impl JsonDepth {
    /// Feeds one line; true when the outermost value closed on it.
    fn feed(&mut self, line: &str) -> bool {
        for b in line.bytes() {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    self.started = true;
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
        self.started && self.depth == 0
    }
}

/// What one provider makes of each SSE event; `SseDecoder` does the framing around it.
pub trait SseHandler: Send {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError>;
    /// The connection closed, with or without the provider's own end marker.
    fn end(&mut self, _out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// A `StreamDecoder` for SSE providers: frames with `SseParser`, translates with the handler.
pub struct SseDecoder<H> {
    parser: SseParser,
    events: Vec<SseEvent>,
    handler: H,
}

impl<H: SseHandler + 'static> SseDecoder<H> {
    pub fn boxed(handler: H) -> Box<dyn StreamDecoder> {
        Self::with_parser(SseParser::default(), handler)
    }

    pub fn with_parser(parser: SseParser, handler: H) -> Box<dyn StreamDecoder> {
        Box::new(SseDecoder {
            parser,
            events: Vec::new(),
            handler,
        })
    }

    fn drain(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        for event in self.events.drain(..) {
            self.handler.event(event, out)?;
        }
        Ok(())
    }
}

impl<H: SseHandler + 'static> StreamDecoder for SseDecoder<H> {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        // Events complete before an oversized line are still delivered, then the error.
        let framed = self.parser.feed(bytes, &mut self.events);
        self.drain(out)?;
        framed
    }

    fn finish(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        self.parser.finish(&mut self.events)?;
        self.drain(out)?;
        self.handler.end(out)
    }

    fn set_max_frame(&mut self, max: usize) {
        self.parser.set_max_frame(max);
    }
}

/// Newline-delimited JSON framing (Cohere v1 streams): one non-empty line per value.
#[derive(Debug)]
pub struct JsonLines {
    /// The current line so far.
    line: Vec<u8>,
    max: usize,
    scanned: u64,
}

impl Default for JsonLines {
    fn default() -> Self {
        JsonLines {
            line: Vec::new(),
            max: DEFAULT_MAX_FRAME,
            scanned: 0,
        }
    }
}

impl JsonLines {
    pub fn set_max_frame(&mut self, max: usize) {
        self.max = max;
    }

    /// Bytes examined so far; equal to the bytes fed, since nothing is scanned twice.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Result<(), ProviderError> {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            self.scanned += end as u64 + 1;
            self.append(&rest[..end])?;
            Self::push(&self.line, out);
            self.line.clear();
            rest = &rest[end + 1..];
        }
        self.scanned += rest.len() as u64;
        self.append(rest)
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), ProviderError> {
        if self.line.len() + bytes.len() > self.max {
            return Err(frame_too_large("line", self.max));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// End of stream: a last line without its newline still counts.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        Self::push(&self.line, out);
        self.line.clear();
    }

    fn push(line: &[u8], out: &mut Vec<String>) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim();
        if !line.is_empty() {
            out.push(line.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts {
            p.feed(&input[last..c], &mut out).unwrap();
            last = c;
        }
        p.feed(&input[last..], &mut out).unwrap();
        p.finish(&mut out).unwrap();
        out
    }

    const SAMPLE: &[u8] =
        b": keep-alive\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n";

    #[test]
    fn parses_events_and_multiline_data() {
        let events = parse_in_pieces(SAMPLE, &[]);
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: Some("message_start".into()),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: None,
                    data: "line1\nline2".into()
                },
                SseEvent {
                    event: None,
                    data: "[DONE]".into()
                },
            ]
        );
    }

    #[test]
    fn same_result_for_every_split_point() {
        let whole = parse_in_pieces(SAMPLE, &[]);
        for a in 0..=SAMPLE.len() {
            for b in a..=SAMPLE.len() {
                assert_eq!(parse_in_pieces(SAMPLE, &[a, b]), whole, "cut at {a},{b}");
            }
        }
    }

    #[test]
    fn final_event_without_blank_line_is_delivered() {
        assert_eq!(
            parse_in_pieces(b"data: tail", &[]),
            vec![SseEvent {
                event: None,
                data: "tail".into()
            }]
        );
    }

    #[test]
    fn json_lines_survive_any_split() {
        let input = b"{\"a\":1}\n\n{\"b\":\"x\\ny\"}\r\n{\"c\":3}";
        let whole = {
            let mut p = JsonLines::default();
            let mut out = Vec::new();
            p.feed(input, &mut out).unwrap();
            p.finish(&mut out);
            out
        };
        assert_eq!(whole, ["{\"a\":1}", "{\"b\":\"x\\ny\"}", "{\"c\":3}"]);
        for cut in 0..=input.len() {
            let mut p = JsonLines::default();
            let mut out = Vec::new();
            p.feed(&input[..cut], &mut out).unwrap();
            p.feed(&input[cut..], &mut out).unwrap();
            p.finish(&mut out);
            assert_eq!(out, whole, "cut at {cut}");
        }
    }

    #[test]
    fn bare_json_between_events_is_delivered_when_asked_for() {
        let input = b"data: {\"a\":1}\n\n{\n  \"error\": {\n    \"code\": 503,\n    \"message\": \"overloaded\"\n  }\n}\n";
        for cut in 0..=input.len() {
            let mut p = SseParser::with_bare_json();
            let mut out = Vec::new();
            p.feed(&input[..cut], &mut out).unwrap();
            p.feed(&input[cut..], &mut out).unwrap();
            p.finish(&mut out).unwrap();
            assert_eq!(out.len(), 2, "cut at {cut}");
            assert_eq!(out[0].data, "{\"a\":1}");
            let err: serde_json::Value = serde_json::from_str(&out[1].data).unwrap_or_default();
            assert_eq!(err["error"]["code"], 503);
        }
        let mut plain = SseParser::default();
        let mut out = Vec::new();
        plain.feed(b"{\"x\": 1}\n\n", &mut out).unwrap();
        plain.finish(&mut out).unwrap();
        assert!(
            out.is_empty(),
            "plain SSE ignores lines that are not fields"
        );
    }

    /// Scanning is linear: every byte fed is examined once, however the stream is cut.
    #[test]
    fn framing_scans_each_byte_once() {
        let mut sse = SseParser::default();
        sse.set_max_frame(64 << 20);
        let mut lines = JsonLines::default();
        lines.set_max_frame(64 << 20);
        let (mut events, mut values) = (Vec::new(), Vec::new());
        let chunk = [b'a'; 4096];
        let total = 16u64 << 20;
        sse.feed(b"data: ", &mut events).unwrap();
        for _ in 0..total / 4096 {
            sse.feed(&chunk, &mut events).unwrap();
            lines.feed(&chunk, &mut values).unwrap();
        }
        sse.feed(b"\r\n\r\n", &mut events).unwrap();
        lines.feed(b"\n", &mut values).unwrap();
        assert_eq!(sse.scanned(), total + 6 + 4);
        assert_eq!(lines.scanned(), total + 1);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.len() as u64, total);
        assert_eq!(values.len(), 1);
    }

    #[test]
    fn frames_over_the_limit_fail_with_a_clear_error() {
        let mut p = SseParser::default();
        p.set_max_frame(16);
        let mut out = Vec::new();
        assert!(p.feed(b"data: 0123456789\n\n", &mut out).is_ok());
        let err = p.feed(b"data: 0123456789abcdef", &mut out).unwrap_err();
        assert!(
            err.to_string()
                .contains("larger than the limit of 16 bytes"),
            "{err}"
        );
        // Many short data lines add up to one oversized event.
        let mut p = SseParser::default();
        p.set_max_frame(16);
        let err = p.feed(
            b"data: 0123\ndata: 4567\ndata: 89ab\ndata: cdef\n",
            &mut out,
        );
        assert!(err.is_err());
        // ...and so do many lines of one bare JSON value.
        let mut p = SseParser::with_bare_json();
        p.set_max_frame(16);
        assert!(
            p.feed(b"{\n\"a\":\n1,\n\"b\":\n2,\n\"c\":3\n", &mut out)
                .is_err()
        );
        let mut lines = JsonLines::default();
        lines.set_max_frame(4);
        let mut values = Vec::new();
        assert!(lines.feed(b"{}\n{}\n", &mut values).is_ok());
        assert!(lines.feed(b"{\"a\":1}", &mut values).is_err());
    }

    /// A bare JSON value over many lines is recognised without re-parsing it per line.
    #[test]
    fn a_long_multi_line_bare_json_value_is_framed_in_linear_time() {
        let mut p = SseParser::with_bare_json();
        let mut out = Vec::new();
        p.feed(b"{\"error\": {\"details\": [\n", &mut out).unwrap();
        let line = b"  \"a \\\" } ] { [ string that looks like it closes\",\n";
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            p.feed(line, &mut out).unwrap();
        }
        p.feed(b"  1\n]}}\n", &mut out).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(out.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&out[0].data).unwrap();
        assert_eq!(v["error"]["details"].as_array().map(Vec::len), Some(10_001));
    }
}
