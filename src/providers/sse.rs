//! Incremental stream framings fed with bytes split anywhere: Server-Sent Events (WHATWG framing)
//! and newline-delimited JSON, plus the decoder shell every SSE-speaking provider shares.

use super::{ProviderError, StreamDecoder};
use crate::llm::StreamDelta;

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// Gemini may send an error after HTTP 200 as bare (often multi-line) JSON, without `data:`.
    bare_json: bool,
    bare: String,
}

impl SseParser {
    /// A parser that also delivers bare JSON objects between events, as data-only events.
    pub fn with_bare_json() -> Self {
        SseParser {
            bare_json: true,
            ..Default::default()
        }
    }

    /// Appends complete events found in `bytes` to `out`; keeps any partial line for the next call.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                // A lone '\r' at the end may be the first half of "\r\n": wait for more bytes.
                if b == b'\r' && i + 1 == self.buf.len() {
                    break;
                }
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                self.line(&line, out);
                i += if b == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
    }

    /// End of stream: a final event without its blank line is still delivered, and so is an
    /// unfinished bare JSON text (its parse error then reports the truncation).
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&self.buf).into_owned();
            self.buf.clear();
            self.line(&line, out);
        }
        self.dispatch(out);
        if !self.bare.is_empty() {
            out.push(SseEvent {
                event: None,
                data: std::mem::take(&mut self.bare),
            });
        }
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if self.bare_json && (!self.bare.is_empty() || line.trim_start().starts_with('{')) {
            self.bare.push_str(line);
            self.bare.push('\n');
            if serde_json::from_str::<serde::de::IgnoredAny>(&self.bare).is_ok() {
                out.push(SseEvent {
                    event: None,
                    data: std::mem::take(&mut self.bare),
                });
            }
            return;
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if let Some(data) = self.data.take() {
            out.push(SseEvent { event, data });
        }
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
        self.parser.feed(bytes, &mut self.events);
        self.drain(out)
    }

    fn finish(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        self.parser.finish(&mut self.events);
        self.drain(out)?;
        self.handler.end(out)
    }
}

/// Newline-delimited JSON framing (Cohere v1 streams): one non-empty line per value.
#[derive(Debug, Default)]
pub struct JsonLines {
    buf: Vec<u8>,
}

impl JsonLines {
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.buf.extend_from_slice(bytes);
        if let Some(last) = self.buf.iter().rposition(|b| *b == b'\n') {
            let rest = self.buf.split_off(last + 1);
            let complete = std::mem::replace(&mut self.buf, rest);
            Self::lines(&complete, out);
        }
    }

    /// End of stream: a last line without its newline still counts.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        let rest = std::mem::take(&mut self.buf);
        Self::lines(&rest, out);
    }

    fn lines(bytes: &[u8], out: &mut Vec<String>) {
        for line in bytes.split(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let line = line.trim();
            if !line.is_empty() {
                out.push(line.to_string());
            }
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
            p.feed(&input[last..c], &mut out);
            last = c;
        }
        p.feed(&input[last..], &mut out);
        p.finish(&mut out);
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
            p.feed(input, &mut out);
            p.finish(&mut out);
            out
        };
        assert_eq!(whole, ["{\"a\":1}", "{\"b\":\"x\\ny\"}", "{\"c\":3}"]);
        for cut in 0..=input.len() {
            let mut p = JsonLines::default();
            let mut out = Vec::new();
            p.feed(&input[..cut], &mut out);
            p.feed(&input[cut..], &mut out);
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
            p.feed(&input[..cut], &mut out);
            p.feed(&input[cut..], &mut out);
            p.finish(&mut out);
            assert_eq!(out.len(), 2, "cut at {cut}");
            assert_eq!(out[0].data, "{\"a\":1}");
            let err: serde_json::Value = serde_json::from_str(&out[1].data).unwrap_or_default();
            assert_eq!(err["error"]["code"], 503);
        }
        let mut plain = SseParser::default();
        let mut out = Vec::new();
        plain.feed(b"{\"x\": 1}\n\n", &mut out);
        plain.finish(&mut out);
        assert!(
            out.is_empty(),
            "plain SSE ignores lines that are not fields"
        );
    }
}
