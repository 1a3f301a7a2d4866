//! Re-framing a stream of unified deltas in a surface's own event dialect, for the surfaces whose
//! streams carry state across chunks (Anthropic's content blocks, the Responses API's items).

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};

use super::error::GatewayError;
use crate::llm::StreamDelta;

/// A surface's stream encoder: fed each upstream read's deltas, then exactly one of `failed` (the
/// stream broke, its end marker never came) or `end`.
pub trait Reframer: Send + 'static {
    fn deltas(&mut self, deltas: Vec<StreamDelta>, out: &mut BytesMut);
    /// Writes the dialect's error event; nothing that looks like a normal end follows.
    fn failed(&mut self, err: &GatewayError, out: &mut BytesMut);
    fn end(&mut self, out: &mut BytesMut);
}

/// One output write per upstream read, in `reframer`'s dialect.
pub fn reframe<R: Reframer>(
    deltas: impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
    reframer: R,
) -> impl Stream<Item = Bytes> + Send + 'static {
    futures::stream::unfold(Some((deltas.boxed(), reframer)), |st| async move {
        let (mut deltas, mut r) = st?;
        let mut buf = BytesMut::new();
        match deltas.next().await {
            Some(Ok(d)) => {
                r.deltas(d, &mut buf);
                Some((buf.freeze(), Some((deltas, r))))
            }
            Some(Err(e)) => {
                r.failed(&e, &mut buf);
                Some((buf.freeze(), None))
            }
            None => {
                r.end(&mut buf);
                Some((buf.freeze(), None))
            }
        }
    })
    .filter(|b| futures::future::ready(!b.is_empty()))
}

/// A named SSE event: `event: <name>` and its JSON data.
pub fn push_named<T: serde::Serialize + ?Sized>(buf: &mut BytesMut, name: &str, value: &T) {
    buf.put_slice(b"event: ");
    buf.put_slice(name.as_bytes());
    buf.put_slice(b"\ndata: ");
    // Writing into BytesMut cannot fail.
    let _ = serde_json::to_writer((&mut *buf).writer(), value);
    buf.put_slice(b"\n\n");
}

/// Collects a reframed stream's text, for the unit tests of the surfaces.
#[cfg(test)]
pub fn run<R: Reframer>(
    mut r: R,
    items: Vec<Result<Vec<StreamDelta>, GatewayError>>,
) -> Vec<(String, serde_json::Value)> {
    let mut buf = BytesMut::new();
    let mut ended = false;
    for item in items {
        match item {
            Ok(d) => r.deltas(d, &mut buf),
            Err(e) => {
                r.failed(&e, &mut buf);
                ended = true;
                break;
            }
        }
    }
    if !ended {
        r.end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = serde_json::Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_default();
                }
            }
            (name, data)
        })
        .collect()
}
